"""Per-epoch training history: metrics, learning rate and time, saved as JSON, plotted to PNG."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from typing_extensions import Self

from ._plotting import pyplot

__all__ = ["History"]


@dataclass
class History:
    """What ``Trainer.fit`` measured, one record per epoch.

    Each record holds ``epoch`` (1-based), ``train_loss``, ``train_accuracy``, and when a
    validation set was given ``val_loss`` and ``val_accuracy``, plus ``lr`` (the learning rate
    of the first parameter group during the epoch), ``features_lr`` once
    :meth:`Trainer.unfreeze_features` was called, and ``time_s`` (wall seconds for the epoch,
    validation included).
    Accuracies are fractions in [0, 1].

    A History reads like the list of its records (``len``, iteration, ``history[-1]``) and,
    indexed by a metric name, gives that metric across epochs.

    Example:
        >>> from vggtransfer import History
        >>> history = History()
        >>> history.append({"epoch": 1, "train_loss": 0.7, "train_accuracy": 0.5})
        >>> history.append({"epoch": 2, "train_loss": 0.4, "train_accuracy": 0.8})
        >>> history["train_loss"]
        [0.7, 0.4]
        >>> [record["epoch"] for record in history], history[-1]["train_accuracy"]
        ([1, 2], 0.8)
    """

    records: list[dict[str, float]] = field(default_factory=list)

    def append(self, record: dict[str, float]) -> None:
        """Add the record of one finished epoch."""
        self.records.append(dict(record))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, float]]:
        """The epoch records in order (copies: changing them leaves the history as it was)."""
        return (dict(record) for record in self.records)

    @overload
    def __getitem__(self, key: str) -> list[float]: ...

    @overload
    def __getitem__(self, key: int) -> dict[str, float]: ...

    def __getitem__(self, key: str | int) -> list[float] | dict[str, float]:
        """One metric across epochs (``history["val_loss"]``), or one epoch's record (``history[-1]``)."""
        if isinstance(key, int) and not isinstance(key, bool):
            try:
                return dict(self.records[key])
            except IndexError:
                raise IndexError(
                    f"History has {len(self.records)} epoch records; index {key} is out of range"
                ) from None
        if not isinstance(key, str):
            raise TypeError(
                f"History: expected a metric name (str) or an epoch index (int) but got {type(key).__name__}"
            )
        if not any(key in record for record in self.records):
            known = sorted({k for record in self.records for k in record})
            raise KeyError(f"History has no metric {key!r}; it has {known}")
        return [record.get(key, math.nan) for record in self.records]

    @property
    def last(self) -> dict[str, float]:
        """The record of the latest epoch (empty before the first)."""
        return dict(self.records[-1]) if self.records else {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible data; :meth:`from_dict` reads it back."""
        return {"records": [dict(record) for record in self.records]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Rebuild a history from :meth:`to_dict` output."""
        return cls([dict(record) for record in data.get("records", [])])

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the history as JSON to ``path`` and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> Self:
        """Read a history written by :meth:`save_json`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draw loss and accuracy per epoch (train and validation) into a PNG file.

        Needs matplotlib, the ``plots`` extra: ``pip install "vggtransfer[plots]"``.

        Raises:
            ModuleNotFoundError: matplotlib is not installed; the message says what to install.
            ValueError: the history is empty.
        """
        plt = pyplot("History.plot")
        from matplotlib.ticker import MaxNLocator

        if not self.records:
            raise ValueError(
                "History.plot: the history is empty; call it after Trainer.fit has finished an epoch"
            )
        epochs = [record["epoch"] for record in self.records]
        figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
        for axis, metric, title in ((loss_axis, "loss", "Loss"), (accuracy_axis, "accuracy", "Accuracy")):
            for split, style in (("train", "o-"), ("val", "s--")):
                key = f"{split}_{metric}"
                if any(key in record for record in self.records):
                    axis.plot(epochs, self[key], style, label=split)
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
            axis.legend()
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path
