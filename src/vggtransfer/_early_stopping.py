"""Early stopping: stop when a monitored metric stops improving, and keep the best weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["EarlyStopping"]


@dataclass(frozen=True)
class EarlyStopping:
    """Stop ``Trainer.fit`` once ``monitor`` has not improved for ``patience`` epochs.

    Training a head on frozen features overfits within a few epochs on small data sets; early
    stopping ends the run at that point and, with ``restore_best``, hands back the weights of
    the best epoch rather than those of the last.

    Args:
        monitor: A metric of the epoch record: ``"val_loss"``, ``"val_accuracy"``,
            ``"train_loss"`` or ``"train_accuracy"``.
        patience: Epochs without improvement tolerated before stopping.
        min_delta: The smallest change that counts as an improvement.
        mode: ``"min"`` or ``"max"``; ``"auto"`` picks ``"max"`` for accuracies and ``"min"``
            otherwise.
        restore_best: At the end of ``fit``, load the weights of the best epoch.

    Example:
        >>> import vggtransfer as vt
        >>> stopper = vt.EarlyStopping(monitor="val_accuracy", patience=2)
        >>> stopper.direction
        'max'
        >>> stopper.improves(0.91, best=0.90)
        True
    """

    monitor: str = "val_loss"
    patience: int = 3
    min_delta: float = 0.0
    mode: Literal["auto", "min", "max"] = "auto"
    restore_best: bool = True

    def __post_init__(self) -> None:
        if self.monitor not in ("val_loss", "val_accuracy", "train_loss", "train_accuracy"):
            raise ValueError(
                f"EarlyStopping: expected monitor to be 'val_loss', 'val_accuracy', 'train_loss' or "
                f"'train_accuracy' but got {self.monitor!r}"
            )
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"EarlyStopping: expected patience to be an int >= 0 but got {self.patience!r}")
        if not (isinstance(self.min_delta, (int, float)) and self.min_delta >= 0):
            raise ValueError(f"EarlyStopping: expected min_delta >= 0 but got {self.min_delta!r}")
        if self.mode not in ("auto", "min", "max"):
            raise ValueError(f"EarlyStopping: expected mode 'auto', 'min' or 'max' but got {self.mode!r}")

    @property
    def direction(self) -> Literal["min", "max"]:
        """Whether smaller (``"min"``) or larger (``"max"``) values are better."""
        if self.mode != "auto":
            return self.mode
        return "max" if self.monitor.endswith("accuracy") else "min"

    def improves(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` by more than ``min_delta``."""
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        if self.direction == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta
