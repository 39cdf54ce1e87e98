"""The result of :func:`compare_backbones`: one row per backbone, the best one, a report on disk."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from ._comparison_plot import plot_comparison
from ._plotting import pyplot

__all__ = ["BestCheckpoint", "Comparison", "attach_checkpoint", "ranking_key"]

# The columns of the Markdown table: row key, heading, and how a value is written.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("val_accuracy", "val accuracy", "percent"),
    ("val_loss", "val loss", "loss"),
    ("train_accuracy", "train accuracy", "percent"),
    ("params", "params", "count"),
    ("feature_dim", "feature dim", "int"),
    ("feature_pass_s", "feature pass (s)", "seconds"),
    ("head_s", "head (s)", "seconds"),
    ("images_per_s", "images/s", "int"),
)


def ranking_key(row: dict[str, Any]) -> tuple[float, float]:
    """Sorts rows best first: higher validation accuracy, then lower validation loss."""
    return (-row["val_accuracy"], row["val_loss"])


def _completed(row: dict[str, Any]) -> bool:
    """Whether ``row`` has a result to rank: no error, finite validation accuracy and loss."""
    values = (row.get("val_accuracy"), row.get("val_loss"))
    return row.get("error") is None and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


class BestCheckpoint:
    """The checkpoint of the best backbone so far, in a temporary folder removed with this object.

    The folder goes when the object is garbage-collected or the process exits, whichever is first.
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="vggtransfer-compare-"))
        self.path = self.folder / "best.pt"
        self.row: dict[str, Any] | None = None
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), ignore_errors=True)

    def improves(self, row: dict[str, Any]) -> bool:
        """Whether ``row`` ranks above the backbone whose checkpoint is kept."""
        return _completed(row) and (self.row is None or ranking_key(row) < ranking_key(self.row))


class Comparison:
    """Backbones trained and evaluated the same way, side by side (see :func:`compare_backbones`).

    Args:
        rows: One dict per backbone, in the order compared (see :func:`compare_backbones` for
            the keys). A row whose ``error`` is not None failed and is never :attr:`best`.
        settings: How they were compared (epochs, batch size, learning rate, images used).

    Attributes:
        rows: The rows, as given.
        settings: The settings, as given.

    Example:
        >>> import vggtransfer as vt
        >>> rows = [
        ...     {"name": "a", "val_accuracy": 0.9, "val_loss": 0.30, "error": None},
        ...     {"name": "b", "val_accuracy": 0.9, "val_loss": 0.25, "error": None},
        ...     {"name": "c", "val_accuracy": None, "val_loss": None, "error": "OutOfMemoryError: ..."},
        ... ]
        >>> vt.Comparison(rows).best
        'b'
    """

    def __init__(self, rows: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> None:
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
            raise TypeError(
                f"Comparison: expected rows to be a list of dicts with a 'name' each but got {rows!r:.200}"
            )
        self.rows = rows
        self.settings = dict(settings or {})
        self._checkpoint: BestCheckpoint | None = None

    @property
    def best(self) -> str | None:
        """The name with the best validation accuracy, ties broken by lower validation loss; None if all failed."""
        completed = [row for row in self.rows if _completed(row)]
        return str(min(completed, key=ranking_key)["name"]) if completed else None

    def to_markdown(self) -> str:
        """The rows as a Markdown table, best first, failures last with their reason."""
        completed = sorted((row for row in self.rows if _completed(row)), key=ranking_key)
        failed = [row for row in self.rows if not _completed(row)]
        best = completed[0] if completed else None
        heading = ["model", *(title for _, title, _ in _COLUMNS), "features cached", "error"]
        lines = ["| " + " | ".join(heading) + " |", "|" + " --- |" * len(heading)]
        for row in completed + failed:
            cells = [f"**{row['name']}**" if row is best else _one_line(row["name"]) or ""]
            cells += [_format(row.get(key), kind) for key, _, kind in _COLUMNS]
            cells += [_cache_summary(row.get("cache")), _one_line(row.get("error")) or ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if best is None:
            lines.append(
                f"No backbone completed: all {len(self.rows)} failed, so there is no best one "
                f"(the error column says why)."
            )
        else:
            lines.append(
                f"Best: **{best['name']}**, validation accuracy {_format(best['val_accuracy'], 'percent')} "
                f"(loss {_format(best['val_loss'], 'loss')})."
            )
        return "\n".join(lines) + "\n"

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``comparison.json``, ``comparison.md``, ``comparison.png`` and the best model's ``best.pt``.

        ``comparison.png`` plots validation accuracy against feature-pass time, one labelled
        point per backbone. ``best.pt`` (written when some backbone completed) is a deployment
        checkpoint for :func:`load_model`: head only when its backbone can be rebuilt from
        pretrained weights, else the whole model. The folder is created; files in it of these
        names are replaced (and a ``best.pt`` removed when no backbone completed).

        Args:
            folder: Where to write them.

        Returns:
            The folder, as a Path.

        Raises:
            TypeError: ``folder`` is not a path.
            ValueError: ``folder`` is empty, or an existing file.
            ModuleNotFoundError: matplotlib (the ``plots`` extra) is missing; nothing is written.
            FileNotFoundError: the best model's temporary checkpoint was deleted meanwhile.
        """
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(
                f"Comparison.save: expected folder to be a path (str or os.PathLike) but got {folder!r}"
            )
        target = Path(folder)
        if str(folder) == "" or (target.exists() and not target.is_dir()):
            found = "an empty path" if str(folder) == "" else f"{str(target)!r}, which is a file"
            raise ValueError(f"Comparison.save: expected folder to be a folder's path but got {found}")
        plt = pyplot("Comparison.save")  # before anything is written
        checkpoint = self._checkpoint
        keep = checkpoint is not None and checkpoint.row is not None and self.best is not None
        if keep and checkpoint is not None and not checkpoint.path.is_file():
            raise FileNotFoundError(
                f"Comparison.save: the best model's checkpoint {str(checkpoint.path)!r} was deleted "
                f"(by a cleaner of temporary files?); run compare_backbones again to write it"
            )
        target.mkdir(parents=True, exist_ok=True)
        report = {"best": self.best, "settings": self.settings, "rows": self.rows}
        # Strict JSON: NaN and infinity (a diverged loss) become null; numpy numbers plain ones.
        (target / "comparison.json").write_text(
            json.dumps(_plain(report), indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8"
        )
        (target / "comparison.md").write_text(self.to_markdown(), encoding="utf-8")
        points = [
            (str(row["name"]), float(row["feature_pass_s"]), float(row["val_accuracy"]))
            for row in self.rows
            if _completed(row) and row.get("feature_pass_s") is not None
        ]
        failed = [
            f"{row['name']} ({str(row.get('error')).split(':')[0]})"
            for row in self.rows
            if not _completed(row)
        ]
        plot_comparison(plt, points, self.best, failed, target / "comparison.png")
        if keep and checkpoint is not None:
            shutil.copyfile(checkpoint.path, target / "best.pt")
        else:  # no best model: a best.pt from an earlier save would contradict comparison.json
            (target / "best.pt").unlink(missing_ok=True)
        return target

    def __repr__(self) -> str:
        return f"Comparison({len(self.rows)} backbones, best={self.best!r})"


def _plain(value: Any) -> Any:
    """``value`` with non-finite floats as None and numpy scalars as Python numbers, for JSON."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy and torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _format(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if kind == "percent":
        return f"{100 * value:.2f}%"
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "count":
        return f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    if kind == "seconds":
        return f"{value:.2f}"
    return f"{round(value)}"


def _cache_summary(report: Any) -> str:
    """``train: on (from disk), val: on (from disk)`` from a Trainer's cache report."""
    if not isinstance(report, dict):
        return ""
    parts = []
    for role, status in report.items():
        label = role[role.find("(") + 1 : -1] if "(" in role else role
        parts.append(f"{label}: {status}")
    return _one_line(", ".join(parts)) or ""


def _one_line(text: Any) -> str | None:
    """``text`` on one line with table separators escaped, for a Markdown cell."""
    if text is None:
        return None
    return " ".join(str(text).split()).replace("|", "\\|")


def attach_checkpoint(comparison: Comparison, checkpoint: BestCheckpoint) -> Comparison:
    """Give ``comparison`` the best model's checkpoint, for :meth:`Comparison.save`; returns it."""
    comparison._checkpoint = checkpoint
    return comparison
