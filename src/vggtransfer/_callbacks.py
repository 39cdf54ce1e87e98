"""Callbacks: user code that ``fit`` calls after each epoch and when it returns.

A callback is any object with ``on_epoch_end(record)``, ``on_fit_end(history)`` or both
(:class:`Callback` spells out the protocol). ``fit`` calls ``on_epoch_end`` once the epoch's
record is complete and its checkpoints are written, so that a callback that raises cannot lose
the epoch; ``on_fit_end`` when ``fit`` returns normally, also after early stopping, and not on
an error or Ctrl-C. Under torchrun only rank 0 calls them, as only it shows progress. The
built-in ones, :class:`CSVLogger` and :class:`TensorBoardLogger`, live in ``_loggers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ._history import History

__all__ = [
    "HOOKS",
    "AnyCallback",
    "Callback",
    "Callbacks",
    "EpochEndCallback",
    "FitEndCallback",
    "check_callbacks",
]

#: The methods a callback may define; each one needs at least one of them.
HOOKS = ("on_epoch_end", "on_fit_end")


class Callback(Protocol):
    """What ``Trainer(callbacks=[...])`` calls: define either method, or both.

    Subclass it to inherit methods that do nothing and override the ones you need, or write any
    class with one or both of these methods. ``on_epoch_end`` gets each epoch's record (the
    dict :class:`History` stores, a copy) after ``last.pt``/``best.pt`` were written;
    ``on_fit_end`` gets the History when ``fit`` returns normally (also after early stopping,
    not on an error or Ctrl-C). Under torchrun only rank 0 calls them.

    Example:
        >>> import torch, vggtransfer as vt
        >>> from torch.utils.data import TensorDataset
        >>> class PrintLoss(vt.Callback):
        ...     def on_epoch_end(self, record):
        ...         print(f"epoch {record['epoch']}: loss {'low' if record['train_loss'] < 9 else 'high'}")
        >>> model = vt.replace_classifier(vt.freeze_features(vt.create_model("resnet18", weights=None)), 2)
        >>> data = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1] * 2))
        >>> trainer = vt.Trainer(model, device="cpu", seed=0, progress=False, callbacks=[PrintLoss()])
        >>> _ = trainer.fit(data, epochs=2, batch_size=4, num_workers=0)
        epoch 1: loss low
        epoch 2: loss low
    """

    def on_epoch_end(self, record: dict[str, float]) -> None:
        """Called after each epoch with its record (``epoch``, ``train_loss``, ...)."""

    def on_fit_end(self, history: History) -> None:
        """Called when ``fit`` returns normally, with the History of all epochs so far."""


class EpochEndCallback(Protocol):
    """A callback with ``on_epoch_end`` alone (for type checkers: :class:`Callback` has both)."""

    def on_epoch_end(self, record: dict[str, float]) -> None: ...


class FitEndCallback(Protocol):
    """A callback with ``on_fit_end`` alone (for type checkers: :class:`Callback` has both)."""

    def on_fit_end(self, history: History) -> None: ...


#: What ``Trainer(callbacks=[...])`` takes: any object with either method, or both.
AnyCallback = Callback | EpochEndCallback | FitEndCallback


def _defines(item: object, hook: str) -> bool:
    """Whether ``item`` has its own ``hook``: not missing, and not :class:`Callback`'s no-op."""
    method = getattr(item, hook, None)
    if method is None:
        return False
    return getattr(method, "__func__", method) is not Callback.__dict__[hook]


def check_callbacks(value: object) -> list[Callback]:
    """``callbacks`` as a list, each item checked to define a hook, and every hook to be callable.

    Raises:
        TypeError: not a list or tuple (a single callback), or an item without a callable hook.
    """
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"Trainer: expected callbacks to be a list of callbacks, such as [vt.CSVLogger('log.csv')], "
            f"but got {value!r:.80} ({type(value).__name__}); wrap a single one in a list"
        )
    for index, item in enumerate(value):
        for hook in HOOKS:
            if _defines(item, hook) and not callable(getattr(item, hook)):
                raise TypeError(
                    f"Trainer: callbacks[{index}] ({type(item).__name__}) has {hook} = "
                    f"{getattr(item, hook)!r:.60}, which is not callable; make it a method"
                )
        if not any(_defines(item, hook) for hook in HOOKS):
            raise TypeError(
                f"Trainer: callbacks[{index}] ({type(item).__name__}) defines neither on_epoch_end(record) "
                f"nor on_fit_end(history); a callback needs at least one of them"
            )
    return list(value)


class Callbacks:
    """The Trainer's callbacks, called in order on rank 0 only.

    Args:
        items: Checked by :func:`check_callbacks`.
        rank: This process's torchrun rank; other ranks than 0 call nothing.
    """

    def __init__(self, items: Sequence[Callback], rank: int) -> None:
        self.items = list(items) if rank == 0 else []

    def epoch_end(self, record: dict[str, float]) -> None:
        """Call every ``on_epoch_end`` with a copy of ``record`` (a callback cannot change the History)."""
        for item in self.items:
            if _defines(item, "on_epoch_end"):
                item.on_epoch_end(dict(record))

    def fit_end(self, history: History) -> None:
        """Call every ``on_fit_end`` with ``history``."""
        for item in self.items:
            if _defines(item, "on_fit_end"):
                item.on_fit_end(history)
