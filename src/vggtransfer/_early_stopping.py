"""Best tracking and early stopping: the best epoch of a metric, its weights, when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ._freeze import frozen_keys
from ._state_dict import cpu_state_dict, merge_into

__all__ = ["BestTracker", "EarlyStopping"]


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


class BestTracker:
    """The best epoch so far of the monitored metric, the wait since, and its weights.

    ``fit`` tells it what to watch (:meth:`watch`), feeds it every epoch's record
    (:meth:`update`), asks whether to stop (:attr:`should_stop`) and finally restores the best
    weights (:meth:`restore`). Without early stopping it still tracks the best epoch, which
    decides when ``best.pt`` is written. Its state survives fits and checkpoints.
    """

    def __init__(self) -> None:
        self.value: float | None = None
        self.epoch: int | None = None
        self.wait = 0
        self.state: dict[str, torch.Tensor] | None = None
        self.rule = EarlyStopping()
        self.stopping = False  # whether the rule may end fit (an EarlyStopping was given)

    def watch(self, early_stopping: EarlyStopping | None, *, has_val: bool) -> None:
        """Monitor ``early_stopping.monitor``, else ``val_loss``, else ``train_loss``.

        Raises:
            TypeError: ``early_stopping`` is not an :class:`EarlyStopping`.
            ValueError: a validation metric is monitored but there is no validation data.
        """
        if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
            raise TypeError(
                f"fit: expected early_stopping to be a vt.EarlyStopping or None but got "
                f"{type(early_stopping).__name__}; e.g. vt.EarlyStopping(monitor='val_loss', patience=3)"
            )
        rule = early_stopping or EarlyStopping(
            monitor="val_loss" if has_val else "train_loss",
            restore_best=False,  # tracking only
        )
        if rule.monitor.startswith("val_") and not has_val:
            raise ValueError(
                f"fit: early stopping monitors {rule.monitor!r} but no validation data was given; "
                f"pass val=... or monitor a training metric, e.g. EarlyStopping(monitor='train_loss')"
            )
        self.rule, self.stopping = rule, early_stopping is not None

    def update(self, record: dict[str, float], network: nn.Module) -> bool:
        """Take an epoch's record; True when it is the best so far (its weights are then kept)."""
        value = record[self.rule.monitor]
        if not self.rule.improves(value, self.value):
            self.wait += 1
            return False
        # Only the trained entries: frozen ones cannot have changed since.
        self.state = cpu_state_dict(network, skip=frozen_keys(network)) if self.rule.restore_best else None
        self.value, self.epoch, self.wait = value, int(record["epoch"]), 0
        return True

    @property
    def should_stop(self) -> bool:
        """Whether early stopping's patience has run out."""
        return self.stopping and self.wait > 0 and self.wait >= self.rule.patience

    def stop_message(self) -> str:
        """What ``fit`` prints when it stops early."""
        return (
            f"early stopping: {self.rule.monitor} has not improved for {self.rule.patience} epochs "
            f"(best {self.value:.4f} at epoch {self.epoch})"
        )

    def restore(self, network: nn.Module) -> None:
        """Load the best epoch's weights into ``network``, if early stopping asked for that."""
        if self.stopping and self.rule.restore_best and self.state is not None:
            merge_into(network, self.state)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: value, epoch, wait and the best weights (CPU tensors)."""
        return {"value": self.value, "epoch": self.epoch, "wait": self.wait, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (validated by the checkpoint reader)."""
        self.value, self.epoch = state["value"], state["epoch"]
        self.wait, self.state = int(state["wait"]), state["state"]
