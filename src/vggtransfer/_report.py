"""The analysis files of an evaluation: confusion_matrix.png, errors.png, misclassified.csv, report.md.

Each file is written to a temporary file in the target folder and moved over any old one with
``os.replace``, so a reader never sees half a file; other files in the folder are left alone.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ._arguments import check_positive_int
from ._checkpoint_file import atomic_write
from ._evaluation import Evaluation, evaluate_samples
from ._report_plots import plot_confusion, plot_errors

if TYPE_CHECKING:
    from ._trainer import Trainer

__all__ = [
    "FILES",
    "IMBALANCE_LIMIT",
    "ReportOptions",
    "balance_warning",
    "markdown",
    "write_files",
    "write_report",
]

#: report.md warns when the largest class has more than this many times the smallest's samples.
IMBALANCE_LIMIT = 3.0
FILES = ("confusion_matrix.png", "errors.png", "misclassified.csv", "report.md")


def write_report(
    trainer: Trainer,
    data: Any,
    folder: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    num_workers: int | None = 0,
    top: int = 16,
    scan: Any = None,
    model: str | None = None,
    timings: dict[str, float] | None = None,
    command: str | None = None,
    summary: str | None = None,
) -> Evaluation:
    """Evaluate ``trainer`` on ``data`` sample by sample and write the analysis files into ``folder``.

    The folder is created if needed. Written (replacing old files of these names atomically,
    leaving any other file alone):

    - ``confusion_matrix.png``: counts and row-normalised (recall on the diagonal).
    - ``errors.png``: the ``top`` misclassified samples with the highest loss, each titled
      "true / predicted / probability of the prediction" (a note when nothing is wrong).
    - ``misclassified.csv``: ``path,true,predicted,probability`` per error, highest loss first
      (path empty when the dataset has no ``samples`` list).
    - ``report.md``: the data (class balance, with a warning beyond 3:1; ``scan``'s bad files),
      the model, accuracy, balanced accuracy, per-class precision/recall/F1/support, the confusion
      matrix, the phase timings and the command that reproduces the run.

    Args:
        trainer: The trained Trainer (one process; refused under torchrun).
        data: A Dataset of ``(image, label)``, e.g. the validation set.
        folder: Where the files go.
        batch_size: Samples per forward pass.
        num_workers: DataLoader workers.
        top: How many errors errors.png shows (1 to 100).
        scan: A ``vggtransfer.data.ScanReport`` whose bad files the report lists.
        model: A description of the model, e.g. ``"vgg16_bn, features frozen, 2 classes"``.
        timings: Seconds each phase took, e.g. ``{"scan": 1.2, "fit": 300.0}``.
        command: The command line that reproduces the run.
        summary: Markdown that opens the data section, e.g. what the model was trained on.

    Returns:
        The :class:`Evaluation` the files were written from.

    Raises:
        TypeError, ValueError: a bad argument, named with what was expected, before anything is written.
        ModuleNotFoundError: matplotlib (the ``plots`` extra) is not installed.

    Example:
        >>> import os, tempfile, torch, vggtransfer as vt
        >>> from torch.utils.data import TensorDataset
        >>> model = vt.replace_classifier(vt.create_model("resnet18", weights=None), 2)
        >>> trainer = vt.Trainer(model, device="cpu", seed=0, progress=False)
        >>> data = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     result = vt.write_report(trainer, data, folder, command="python train.py")
        ...     sorted(os.listdir(folder))
        ['confusion_matrix.png', 'errors.png', 'misclassified.csv', 'report.md']
        >>> 0 <= result.metrics["balanced_accuracy"] <= 1
        True
    """
    options = ReportOptions(top, scan, model, timings, command, summary)
    target = options.check(folder, "write_report")  # before the evaluation runs
    evaluation = evaluate_samples(trainer, data, batch_size=batch_size, num_workers=num_workers)
    write_files(evaluation, target, options)
    return evaluation


def write_files(evaluation: Evaluation, target: Path, options: ReportOptions) -> dict[str, Path]:
    """Write the four files of ``evaluation`` into ``target`` (checked by :meth:`ReportOptions.check`)."""
    target.mkdir(parents=True, exist_ok=True)
    paths = {name: target / name for name in FILES}
    _atomic(paths["confusion_matrix.png"], lambda f: plot_confusion(evaluation, f), binary=True)
    _atomic(paths["errors.png"], lambda f: plot_errors(evaluation, f, options.top), binary=True)
    _atomic(
        paths["misclassified.csv"],
        lambda f: _write_csv(evaluation, f),
        binary=False,
        errors="surrogateescape",
    )
    text = markdown(evaluation, **vars(options))
    _atomic(paths["report.md"], lambda f: f.write(text), binary=False, errors="replace")
    return paths


@dataclass(frozen=True)
class ReportOptions:
    """What the report says besides the evaluation: see :func:`write_report` for each field."""

    top: int = 16
    scan: Any = None
    model: str | None = None
    timings: dict[str, float] | None = None
    command: str | None = None
    summary: str | None = None

    def check(self, folder: object, what: str) -> Path:
        """Every option checked before anything is computed or written; returns the folder."""
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(
                f"{what}: expected folder to be a path (str or os.PathLike) but got {type(folder).__name__}"
            )
        target = Path(folder)
        if target.exists() and not target.is_dir():
            raise ValueError(
                f"{what}: expected folder to be a directory but {str(target)!r} is a file; give a folder"
            )
        check_positive_int(self.top, "top", what, limit=100)
        if self.scan is not None and not (hasattr(self.scan, "good") and hasattr(self.scan, "bad")):
            raise TypeError(
                f"{what}: expected scan to be a vggtransfer.data.ScanReport (from scan_images) or None "
                f"but got {type(self.scan).__name__}"
            )
        for name in ("model", "command", "summary"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{what}: expected {name} to be a str or None but got {type(value).__name__}")
        if self.timings is not None and not _seconds_by_phase(self.timings):
            raise TypeError(
                f"{what}: expected timings to be a dict of phase name (str) to seconds (a finite number), "
                f"e.g. {{'fit': 12.5}}, but got {self.timings!r}"
            )
        return target


def _seconds_by_phase(timings: object) -> bool:
    return isinstance(timings, dict) and all(
        isinstance(k, str) and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        for k, v in timings.items()
    )


def _atomic(path: Path, write: Callable[[IO[Any]], Any], *, binary: bool, errors: str = "strict") -> None:
    """Write through ``write`` (a binary or a UTF-8 text file) with the library's atomic writer.

    ``errors`` says what becomes of a file name that is not UTF-8 (the OS hands it over
    surrogate-escaped): ``"surrogateescape"`` writes its original bytes, so a CSV's path opens
    again; ``"replace"`` shows ``?`` instead, so that report.md stays valid UTF-8 for viewers.
    """

    def into(raw: IO[bytes]) -> None:
        if binary:
            write(raw)
            return
        text = io.TextIOWrapper(raw, encoding="utf-8", errors=errors, newline="")
        write(text)
        text.flush()
        text.detach()  # the raw file stays open for the writer to fsync and close

    atomic_write(path, into, "a report file")


def _write_csv(evaluation: Evaluation, f: IO[str]) -> None:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["path", "true", "predicted", "probability"])
    names = evaluation.class_names
    for s in evaluation.errors:
        writer.writerow([s.path or "", names[s.true], names[s.predicted], f"{s.probability:.6f}"])


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def balance_warning(names: Sequence[str], supports: Sequence[int]) -> str | None:
    """The warning line when the largest class has more than 3x the smallest's samples, else None."""
    largest, smallest = (
        max(range(len(names)), key=supports.__getitem__),
        min(range(len(names)), key=supports.__getitem__),
    )
    big, small = supports[largest], supports[smallest]
    if small * IMBALANCE_LIMIT >= big:
        return None
    ratio = "no samples" if small == 0 else f"{big / small:.1f}:1"
    return (
        f"**Warning: the classes are imbalanced beyond 3:1** ({names[largest]!r} has {big} samples, "
        f"{names[smallest]!r} {small}: {ratio}). Accuracy favours the large classes: read balanced "
        f"accuracy and per-class recall, and consider more data for the small ones, or weighting the "
        f'loss: `Trainer(class_weights="balanced")` (`vggtransfer train --class-weights balanced`).'
    )


def markdown(
    evaluation: Evaluation,
    *,
    top: int,
    scan: Any,
    model: str | None,
    timings: dict[str, float] | None,
    command: str | None,
    summary: str | None = None,
) -> str:
    """report.md's text."""
    m, names = evaluation.metrics, evaluation.class_names
    supports = [m["per_class"][n]["support"] for n in names]
    out = io.StringIO()
    out.write("# Evaluation report\n\n## Data\n\n" + (f"{summary}\n\n" if summary else ""))
    out.write(f"Evaluated: {m['count']} samples in {len(names)} classes.\n\n")
    if scan is not None:
        out.write(f"Image scan: {len(scan.good)} good images, {len(scan.bad)} bad files (left out).\n\n")
        if scan.bad:
            out.write(_table(["bad file", "reason"], [[f"`{b.path}`", b.reason] for b in scan.bad]) + "\n\n")
    out.write("### Class balance of the evaluated samples\n\n")
    share = [f"{100 * s / max(m['count'], 1):.1f}%" for s in supports]
    out.write(_table(["class", "samples", "share"], list(zip(names, supports, share, strict=True))) + "\n\n")
    warning = balance_warning(names, supports)
    out.write((warning + "\n\n") if warning else "The classes are balanced within 3:1.\n\n")
    if model is not None:
        out.write(f"## Model\n\n{model}\n\n")
    errors = len(evaluation.errors)
    out.write(
        f"## Metrics\n\n- accuracy: {m['accuracy']:.4f} ({m['count'] - errors} of {m['count']} correct, "
        f"{errors} errors)\n- balanced accuracy: {m['balanced_accuracy']:.4f} (mean recall over the classes "
        f"present)\n- loss (cross-entropy): {m['loss']:.4f}\n\n"
    )
    rows = [
        [
            n,
            *(f"{m['per_class'][n][k]:.4f}" for k in ("precision", "recall", "f1")),
            m["per_class"][n]["support"],
        ]
        for n in names
    ]
    out.write(_table(["class", "precision", "recall", "F1", "support"], rows) + "\n\n")
    out.write("## Confusion matrix\n\nRows: true class; columns: predicted class.\n\n")
    matrix = [[f"**{n}**", *row] for n, row in zip(names, m["confusion_matrix"], strict=True)]
    out.write(_table(["true \\ predicted", *names], matrix) + "\n\n")
    out.write("![confusion matrix](confusion_matrix.png)\n\n")
    out.write(
        f"## Errors\n\nThe {min(errors, top)} worst are in errors.png, all {errors} in misclassified.csv.\n\n"
    )
    out.write("![errors](errors.png)\n\n")
    if timings:
        out.write(
            "## Timings\n\n"
            + _table(["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()])
            + "\n\n"
        )
    if command is not None:
        out.write(f"## Reproduce\n\n```sh\n{command}\n```\n")
    return out.getvalue()
