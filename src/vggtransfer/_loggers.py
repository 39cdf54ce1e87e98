"""The built-in callbacks: a CSV log of the epochs, and TensorBoard scalars.

Both are resume-aware: a Trainer resumed from a checkpoint (say after epoch 2) and fit again
with a logger on the same file or folder continues the log from epoch 3. The CSV log keeps the
earlier epochs' rows and replaces later ones (a run interrupted after epoch 4 but resumed from
epoch 2's checkpoint trains epochs 3 and 4 again); TensorBoard is told to drop the old events
of those epochs (``purge_step``).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from ._checkpoint_file import atomic_write_text
from ._history import History

__all__ = ["CSVLogger", "TensorBoardLogger"]


def _path(value: object, name: str, caller: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{caller}: expected {name} to be a path (str or os.PathLike) but got {value!r:.80} "
            f"({type(value).__name__})"
        )
    return Path(value)


class CSVLogger:
    """A callback that writes one CSV row per epoch: the epoch's record, as :class:`History` has it.

    The columns are every key the records have had, in the order they appeared (``epoch``
    first): keys that appear later, such as ``features_lr`` after :meth:`Trainer.unfreeze_features`,
    add a column, and earlier rows leave it empty. Numbers are written exactly (``repr``), so
    reading them back gives the History's values. The file is rewritten atomically after each
    epoch: it always holds a complete log, even if the process is killed. Its folder is created
    at the first epoch, so that making a logger writes nothing.

    Resuming: the rows of epochs before the first epoch this ``fit`` trains are kept, the rest
    replaced, so a resumed run's log continues its own. The logger never destroys other data: a
    file that exists and is not a CSV log (no ``epoch`` first column, or rows that do not parse)
    is refused when the logger is made, and left as it is.

    Args:
        path: The CSV file, e.g. ``"runs/pets/log.csv"``.

    Raises:
        TypeError: ``path`` is not a path.
        ValueError: ``path`` exists and is not a CSV log this logger could have written.

    Example:
        >>> import csv, tempfile, torch, vggtransfer as vt
        >>> from torch.utils.data import TensorDataset
        >>> model = vt.replace_classifier(vt.freeze_features(vt.create_model("resnet18", weights=None)), 2)
        >>> data = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1] * 2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     log = vt.CSVLogger(f"{folder}/log.csv")
        ...     trainer = vt.Trainer(model, device="cpu", seed=0, progress=False, callbacks=[log])
        ...     _ = trainer.fit(data, epochs=2, batch_size=4, num_workers=0)
        ...     rows = list(csv.DictReader(open(f"{folder}/log.csv")))
        >>> [row["epoch"] for row in rows], list(rows[0])[:3]
        (['1', '2'], ['epoch', 'train_loss', 'train_accuracy'])
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = _path(path, "path", "CSVLogger")
        _read_log(self.path)  # refuse a file that is not a log now, before any training

    def on_epoch_end(self, record: dict[str, float]) -> None:
        """Rewrite the log with this epoch's row, after the rows of the epochs before it."""
        columns, rows = _read_log(self.path)
        epoch = int(record["epoch"])
        rows = [row for row in rows if int(float(row["epoch"])) < epoch]
        rows.append({key: _cell(value) for key, value in record.items()})
        columns += [key for key in record if key not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, text.getvalue())

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.path)!r})"


def _cell(value: Any) -> str:
    """A record's value as text that reads back to the same number."""
    return repr(float(value)) if isinstance(value, float) else str(value)


def _read_log(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of the log at ``path`` (none when there is no file, or an empty one).

    Raises:
        ValueError: the file is not a log :class:`CSVLogger` wrote.
    """
    if not path.exists():
        return [], []
    refusal = (
        f"CSVLogger: {str(path)!r} exists but is not a CSV log of epochs; refusing to overwrite it. "
        f"Choose another path, or move the file away"
    )
    if not path.is_file():
        raise ValueError(f"{refusal} (it is not a regular file)")
    try:
        text = path.read_text(encoding="utf-8")
        if not text:
            return [], []
        reader = csv.DictReader(io.StringIO(text))
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{refusal} ({exc})") from None
    if not columns or columns[0] != "epoch":
        raise ValueError(f"{refusal} (its first column is {columns[0] if columns else None!r}, not 'epoch')")
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values() or not _is_epoch(row["epoch"]):
            raise ValueError(f"{refusal} (line {line} is not a row of epoch numbers)")
    return columns, rows


def _is_epoch(cell: str) -> bool:
    try:
        return float(cell).is_integer() and float(cell) >= 1
    except ValueError:
        return False


class TensorBoardLogger:
    """A callback that writes each epoch's record to TensorBoard: one scalar per key, at step = epoch.

    Uses ``torch.utils.tensorboard.SummaryWriter``; events are flushed after every epoch and the
    writer is closed when ``fit`` returns. Resuming from a checkpoint continues the curves: the
    events of the epochs trained again are dropped (TensorBoard's ``purge_step``). View them with
    ``tensorboard --logdir <log_dir>``. Needs the ``tensorboard`` package: the extra
    ``pip install "vggtransfer[tensorboard]"``.

    Args:
        log_dir: The folder of the event files, e.g. ``"runs/pets"``; created at the first epoch.

    Raises:
        TypeError: ``log_dir`` is not a path.
        ImportError: tensorboard is not installed.
        ValueError: ``log_dir`` is an existing file.

    Example:
        >>> import os, tempfile, torch, vggtransfer as vt
        >>> from torch.utils.data import TensorDataset
        >>> model = vt.replace_classifier(vt.freeze_features(vt.create_model("resnet18", weights=None)), 2)
        >>> data = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1] * 2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     board = vt.TensorBoardLogger(folder)
        ...     trainer = vt.Trainer(model, device="cpu", seed=0, progress=False, callbacks=[board])
        ...     _ = trainer.fit(data, epochs=2, batch_size=4, num_workers=0)
        ...     written = any(name.startswith("events.out.tfevents") for name in os.listdir(folder))
        >>> written
        True
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = _path(log_dir, "log_dir", "TensorBoardLogger")
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise ValueError(
                f"TensorBoardLogger: expected log_dir to be a folder but {str(self.log_dir)!r} is a file; "
                f"pass a folder's path (it is created if missing)"
            )
        try:  # imported here, not with vggtransfer: tensorboard is an optional extra
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                'TensorBoardLogger needs the tensorboard package: pip install "vggtransfer[tensorboard]"'
            ) from None
        self._writer_class = SummaryWriter
        self._writer: Any = None

    def on_epoch_end(self, record: dict[str, float]) -> None:
        """Add the record's values as scalars at step ``record["epoch"]``, and flush."""
        epoch = int(record["epoch"])
        if self._writer is None:  # the first epoch of this fit: events from it on are replaced
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=epoch)
        for key, value in record.items():
            if key != "epoch":
                self._writer.add_scalar(key, float(value), global_step=epoch)
        self._writer.flush()

    def on_fit_end(self, history: History) -> None:
        """Close the event file; a later ``fit`` opens a new one."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger({str(self.log_dir)!r})"
