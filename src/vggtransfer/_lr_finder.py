"""The learning-rate range test: raise the rate exponentially step by step and watch the loss.

Smith's range test (2015, popularised as fastai's ``lr_find``) trains for a few dozen steps
while the learning rate grows from tiny to huge. The loss first barely moves, then falls, then
diverges; a good rate lies on the falling stretch. :func:`range_test` runs it on the Trainer's
own collaborators (model, optimizer, loss, runtime, a batch source) and puts every one of them
back afterwards, bit for bit, through a :class:`TrainingSnapshot`; :class:`LRFinder` holds the
curve, the suggested rate and its plot.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from collections import defaultdict
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._arguments import check_learning_rate, check_positive_int, check_workers
from ._plotting import pyplot
from ._progress import Progress
from ._rng import capture_rng, epoch_rng, restore_rng
from ._runtime import Runtime, unwrap
from ._sources import BatchSource

__all__ = [
    "LRFinder",
    "MovingAverage",
    "RangePlan",
    "TrainingSnapshot",
    "check_range",
    "range_test",
    "smooth",
]

_CALLER = "Trainer.find_lr"
_DIVERGED = 4.0  # the test ends once the smoothed loss exceeds this many times its minimum
_FLAT = 0.01  # a curve whose smoothed loss never falls by this fraction of its first value is flat
_MISSING = object()


class MovingAverage:
    """The bias-corrected exponential moving average of a stream of losses (Adam's correction).

    After ``n`` values, ``average = smoothing * average + (1 - smoothing) * value`` is divided by
    ``1 - smoothing ** n``, so that the first values are not pulled towards zero. A NaN or
    infinite value makes every later one non-finite.
    """

    def __init__(self, smoothing: float) -> None:
        self.smoothing, self.average, self.count = smoothing, 0.0, 0

    def update(self, value: float) -> float:
        """Take in ``value``; return the smoothed value so far."""
        self.count += 1
        self.average = self.smoothing * self.average + (1 - self.smoothing) * value
        return self.average / (1 - self.smoothing**self.count)


def smooth(losses: list[float], smoothing: float) -> list[float]:
    """``losses`` through a :class:`MovingAverage` with factor ``smoothing``."""
    average = MovingAverage(smoothing)
    return [average.update(loss) for loss in losses]


@dataclass(frozen=True)
class RangePlan:
    """The checked settings of one range test.

    Attributes:
        start_lr: The first step's learning rate (of the first parameter group).
        end_lr: The last step's.
        steps: How many steps at most; fewer when the loss diverges first.
    """

    start_lr: float
    end_lr: float
    steps: int

    def lr(self, step: int) -> float:
        """The rate of step ``step`` (0-based): ``start_lr * (end_lr / start_lr) ** (step / (steps - 1))``."""
        return float(self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.steps - 1)))

    @property
    def smoothing(self) -> float:
        """``steps / (steps + 20)``: the moving average then lags by a twentieth of the steps.

        An average's lag shifts the curve to higher rates; a fixed smoothing such as 0.98 lags
        by 49 steps, half of a 100-step test (four decades of rate). Tying it to the step count
        keeps the lag at a twentieth of the range whatever ``steps`` is, and a 100-step test
        still averages the noise of about eleven batches.
        """
        return self.steps / (self.steps + 20)


def check_range(
    start_lr: object, end_lr: object, steps: object, batch_size: object, num_workers: object
) -> RangePlan:
    """``find_lr``'s settings checked, before anything is computed or changed.

    Raises:
        TypeError: a value of the wrong kind (a bool is not a count).
        ValueError: a rate that is not finite and > 0, ``end_lr <= start_lr``, ``steps < 2``,
            or a ``batch_size`` / ``num_workers`` out of range.
    """
    start = check_learning_rate(start_lr, "start_lr", _CALLER)
    end = check_learning_rate(end_lr, "end_lr", _CALLER)
    if end <= start:
        raise ValueError(
            f"{_CALLER}: expected end_lr to be greater than start_lr={start!r} (the rate rises from "
            f"start_lr to end_lr) but got end_lr={end!r}"
        )
    if not math.isfinite(end / start):
        raise ValueError(
            f"{_CALLER}: expected end_lr / start_lr to be a finite ratio but {end!r} / {start!r} "
            f"overflows; raise start_lr (the default is 1e-7) or lower end_lr"
        )
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(
            f"{_CALLER}: expected steps to be an int >= 2 but got {steps!r} ({type(steps).__name__})"
        )
    if steps < 2:
        raise ValueError(
            f"{_CALLER}: expected steps to be an int >= 2 (a curve needs two points) but got {steps!r}"
        )
    check_positive_int(batch_size, "batch_size", _CALLER)
    check_workers(num_workers, _CALLER)
    return RangePlan(start, end, int(steps))


@dataclass
class LRFinder:
    """The result of :meth:`Trainer.find_lr`: the loss at each learning rate, and a suggestion.

    Attributes:
        lrs: The learning rate of each step (of the first parameter group; other groups moved
            by the same factors), rising exponentially from ``start_lr``. Shorter than the
            ``steps`` asked for when the test stopped because the loss diverged.
        losses: The loss of each step's batch, computed before that step's update (the mean
            over torchrun's processes). The last may be NaN or infinite: that ended the test.
        start_lr: The lower end of the range tested.
        end_lr: The upper end.
        smoothing: The factor of the moving average in :attr:`smoothed`, in [0, 1).

    Example:
        >>> from vggtransfer import LRFinder
        >>> result = LRFinder([1e-4, 1e-3, 1e-2, 1e-1], [1.0, 0.8, 0.3, 5.0], 1e-4, 1e-1, smoothing=0.0)
        >>> result.suggestion  # a tenth of the rate where the smoothed loss was lowest
        0.001
        >>> result
        LRFinder(4 steps, lr 1.0e-04 to 1.0e-01, suggestion 1.0e-03)
    """

    lrs: list[float]
    losses: list[float]
    start_lr: float
    end_lr: float
    smoothing: float = 0.0

    def __post_init__(self) -> None:
        start = check_learning_rate(self.start_lr, "start_lr", "LRFinder")
        end = check_learning_rate(self.end_lr, "end_lr", "LRFinder")
        if end <= start:
            raise ValueError(
                f"LRFinder: expected end_lr to be greater than start_lr={start!r} but got {end!r}"
            )
        if len(self.lrs) != len(self.losses):
            raise ValueError(
                f"LRFinder: expected one loss per learning rate but got {len(self.lrs)} lrs and "
                f"{len(self.losses)} losses"
            )
        smoothing = self.smoothing
        if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0 <= smoothing < 1:
            raise ValueError(f"LRFinder: expected smoothing to be a number in [0, 1) but got {smoothing!r}")
        self.lrs, self.losses = [float(x) for x in self.lrs], [float(x) for x in self.losses]
        self.start_lr, self.end_lr, self.smoothing = start, end, float(smoothing)

    def __repr__(self) -> str:
        reached = f"{self.lrs[-1]:.1e}" if self.lrs else "-"
        return (
            f"LRFinder({len(self.lrs)} steps, lr {self.start_lr:.1e} to {reached}, "
            f"suggestion {self.suggestion:.1e})"
        )

    @property
    def smoothed(self) -> list[float]:
        """The losses as a bias-corrected exponential moving average with factor :attr:`smoothing`.

        After ``n`` losses, ``average = smoothing * average + (1 - smoothing) * loss`` divided by
        ``1 - smoothing ** n`` (Adam's correction, so that the first values are not pulled
        towards zero). A non-finite loss makes every later value non-finite.
        """
        return smooth(self.losses, self.smoothing)

    @property
    def suggestion(self) -> float:
        """A tenth of the rate at which the smoothed loss was lowest, kept inside the range.

        The minimum is where the loss stops improving and training starts to become unstable;
        a tenth of it lies on the falling stretch of the curve, an order of magnitude below
        divergence (the "minimum / 10" rule of fastai's ``lr_find``). The minimum is used rather
        than the steepest slope because the lowest point of a smoothed curve hardly moves with
        batch noise, while its slope, a difference of noisy values, often peaks on a noise
        spike in short runs.

        Fallbacks, so that it is always a finite rate in ``[start_lr, end_lr]``: a curve that
        never falls more than 1% below its first smoothed value (flat, rising from the start,
        or a single point) and one without any finite loss give ``start_lr``, the most cautious
        rate: nothing in the range helped, so lower ``start_lr`` or check the data and labels.
        """
        points = [(loss, lr) for loss, lr in zip(self.smoothed, self.lrs, strict=True) if math.isfinite(loss)]
        if not points:
            return self.start_lr
        first = points[0][0]
        lowest, at = min(points, key=lambda point: point[0])  # the first of equal minima
        if first - lowest <= _FLAT * abs(first):
            return self.start_lr
        return min(max(at / 10, self.start_lr), self.end_lr)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draw the smoothed loss against the learning rate (log scale) with the suggestion, as a PNG.

        The raw loss of each step is drawn faintly behind it. The vertical range covers the
        smoothed curve's descent to its minimum and the start of the rise after it, so that a
        divergence to huge values leaves the top of the plot instead of flattening the rest.
        Needs matplotlib, the ``plots`` extra:
        ``pip install "vggtransfer[plots]"``.

        Args:
            path: The file to write, ending in ``.png``; its folder is created.

        Returns:
            ``path`` as a Path.

        Raises:
            ModuleNotFoundError: matplotlib is not installed; the message says what to install.
            TypeError, ValueError: ``path`` is not a ``.png`` file path, or no loss was finite.
        """
        target = _png_path(path)
        points = [(lr, loss) for lr, loss in zip(self.lrs, self.smoothed, strict=True) if math.isfinite(loss)]
        if not points:
            raise ValueError("LRFinder.plot: no finite loss was recorded, so there is no curve to draw")
        plt = pyplot("LRFinder.plot")
        lrs, smoothed = (list(values) for values in zip(*points, strict=True))
        raw = [(lr, loss) for lr, loss in zip(self.lrs, self.losses, strict=True) if math.isfinite(loss)]
        suggestion = self.suggestion
        figure, axis = plt.subplots(figsize=(7, 4.5))
        axis.plot(*zip(*raw, strict=True), color="0.7", linewidth=0.8, label="loss of each step")
        axis.plot(lrs, smoothed, color="C0", linewidth=2, label="smoothed loss")
        marked = float(np.interp(math.log(suggestion), np.log(lrs), smoothed))
        axis.axvline(suggestion, color="C3", linestyle="--", linewidth=1)
        axis.plot([suggestion], [marked], "o", color="C3", label=f"suggestion {suggestion:.1e}")
        axis.set_xscale("log")
        axis.set_ylim(*_loss_limits(smoothed))
        axis.set_xlabel("learning rate (log scale)")
        axis.set_ylabel("training loss")
        axis.set_title("Learning-rate range test")
        axis.grid(alpha=0.3)
        axis.grid(alpha=0.1, which="minor")
        axis.legend()
        figure.tight_layout()
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=100, format="png")
        plt.close(figure)
        return target


def _loss_limits(smoothed: list[float]) -> tuple[float, float]:
    """The y range: the minimum, the highest value before it, and the rise after it up to as much again."""
    lowest = min(smoothed)
    before = max(smoothed[: smoothed.index(lowest) + 1])
    # A flat or rising curve has no descent to measure the room by: a tenth of its level then.
    span = max(before - lowest, 0.1 * abs(before)) or 1.0
    return lowest - 0.1 * span, min(max(smoothed), before + span) + 0.1 * span


def _png_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(
            f"LRFinder.plot: expected path to be a file path (str or os.PathLike) such as 'lr.png' "
            f"but got {path!r} ({type(path).__name__})"
        )
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(
            f"LRFinder.plot: expected path to end in .png (the plot is a PNG image) but got {str(path)!r}"
        )
    if target.is_dir():
        raise ValueError(f"LRFinder.plot: expected path to be a file but {str(path)!r} is a folder")
    return target


class TrainingSnapshot:
    """Everything a range test changes, saved when it starts and put back bitwise by :meth:`restore`.

    Saved: the values of the parameters the optimizer holds and of every buffer (on the CPU,
    sparing accelerator memory), each module's train/eval flag, the gradients, the optimizer's
    state and parameter-group settings, the scheduler's and the gradient scaler's state, and the
    random generators (torch CPU and CUDA, Python's, NumPy's). Frozen parameters outside the
    optimizer cannot change and are not copied.

    The optimizer's state is not copied back but kept aside: :meth:`take` gives the optimizer a
    copy to work on, and clears the gradients (kept aside too), so that the originals are never
    written to.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
    ) -> None:
        network = unwrap(model)
        held = [p for group in optimizer.param_groups for p in group["params"]]
        changing = {id(t): t for t in [*held, *network.buffers()]}
        self.values = [(t, t.detach().to("cpu", copy=True)) for t in changing.values()]
        self.grads = [(p, p.grad) for p in {id(p): p for p in [*network.parameters(), *held]}.values()]
        self.modes = [(module, module.training) for module in model.modules()]
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.state = optimizer.state
        self.groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        # Set by torch's LR schedulers on optimizer.step(), read by their "step order" warning.
        self.optimizer_called = optimizer.__dict__.get("_opt_called", _MISSING)
        self.scheduler_state = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
        self.scaler_state = copy.deepcopy(scaler.state_dict())
        self.rng = capture_rng()

    @classmethod
    def take(
        cls, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
    ) -> TrainingSnapshot:
        """Save the state, then let the optimizer work on a copy of its state and clear the gradients."""
        snapshot = cls(model, optimizer, scheduler, scaler)
        optimizer.state = defaultdict(
            dict,
            {
                param: {
                    k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                    for k, v in state.items()
                }
                for param, state in snapshot.state.items()
            },
        )
        for param, _ in snapshot.grads:
            param.grad = None  # a later backward then makes new tensors instead of adding into these
        return snapshot

    def restore(self) -> None:
        """Put everything back as it was when the snapshot was taken."""
        with torch.no_grad():
            for tensor, value in self.values:
                tensor.copy_(value)
        for param, grad in self.grads:
            param.grad = grad
        for module, training in self.modes:
            module.training = training
        self.optimizer.state = self.state
        for group, saved in zip(self.optimizer.param_groups, self.groups, strict=True):
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            group.update(saved)
        if self.optimizer_called is _MISSING:
            self.optimizer.__dict__.pop("_opt_called", None)
        else:
            self.optimizer.__dict__["_opt_called"] = self.optimizer_called
        if self.scheduler is not None:
            self.scheduler.load_state_dict(copy.deepcopy(self.scheduler_state))
        self.scaler.load_state_dict(copy.deepcopy(self.scaler_state))
        restore_rng(self.rng)


def _group_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's rate as a multiple of the first group's, kept during the test."""
    rates = [float(group["lr"]) or float(group.get("initial_lr", 0.0)) for group in optimizer.param_groups]
    return [rate / rates[0] if rates[0] > 0 else 1.0 for rate in rates]


def _endless(source: BatchSource) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """The batches of epoch 1, 2, ... of ``source``, for as long as they are asked for."""
    epoch = 0
    while True:
        epoch += 1
        count = 0
        batches = iter(source.batches(epoch))
        try:
            for batch in batches:
                count += 1
                yield batch
        finally:
            close = getattr(batches, "close", None)  # stops a loader's workers when the test ends
            if close is not None:
                close()
        if count == 0:
            raise ValueError(
                f"{_CALLER}: the training data gave no batches (an empty DataLoader, or drop_last with "
                f"fewer samples than batch_size); expected at least one"
            )


def range_test(
    make_source: Callable[[], BatchSource],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    runtime: Runtime,
    progress: Progress,
    seed: int,
    plan: RangePlan,
) -> LRFinder:
    """Run the range test of ``plan`` on the batches of ``make_source()``, then restore everything.

    The snapshot is taken before ``make_source`` runs, so that whatever making the source changes
    (a feature pass switches the model's modes) is undone too.

    Each step sets every parameter group's rate (group 0 at ``plan.lr(step)``, the others at
    their ratio to it), computes the loss of one training batch, records it and then takes an
    optimizer step. The scheduler is not stepped. The test stops after ``plan.steps`` steps or
    when the smoothed loss exceeds 4x its minimum (for positive losses) or is not finite; that
    is its expected end, not an error. Dropout draws from a generator seeded from ``seed``, so
    the same seed gives the same curve. Everything is restored also when a step raises or
    the test is interrupted.
    """
    snapshot = TrainingSnapshot.take(model, optimizer, scheduler, scaler)
    try:
        source = make_source()
        with epoch_rng(seed, 0, runtime.device):  # epoch 0 is never one of fit's
            result = _run(source, model, optimizer, scaler, loss_fn, runtime, progress, plan)
    finally:
        snapshot.restore()
    stopped = " (stopped: the loss diverged)" if len(result.lrs) < plan.steps else ""
    progress.message(
        f"find_lr: {len(result.lrs)} steps, lr {plan.start_lr:.1e} to {result.lrs[-1]:.1e}{stopped}; "
        f"suggestion {result.suggestion:.1e}"
    )
    return result


def _run(
    source: BatchSource,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    runtime: Runtime,
    progress: Progress,
    plan: RangePlan,
) -> LRFinder:
    ratios = _group_ratios(optimizer)
    average, lowest = MovingAverage(plan.smoothing), math.inf
    lrs: list[float] = []
    losses: list[float] = []
    model.train()
    progress.start_epoch(0, 0, plan.steps, "find_lr")
    with closing(_endless(source)) as batches:
        for step, batch in zip(range(plan.steps), batches, strict=False):
            lr = plan.lr(step)
            for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
                group["lr"] = lr * ratio
            inputs, targets = runtime.to_device(batch[0]), batch[1].to(runtime.device, non_blocking=True)
            with runtime.autocast():
                loss = loss_fn(source.forward(inputs), targets)
            value = runtime.mean_across(loss)  # the same on every process: all stop together
            lrs.append(lr)
            losses.append(value)
            progress.step(value, int(targets.shape[0]))
            smoothed = average.update(value)
            if not math.isfinite(smoothed) or (lowest > 0 and smoothed > _DIVERGED * lowest):
                break
            lowest = min(lowest, smoothed)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return LRFinder(lrs, losses, plan.start_lr, plan.end_lr, plan.smoothing)
