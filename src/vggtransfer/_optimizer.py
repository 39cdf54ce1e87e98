"""The optimizer and its learning-rate schedule: defaults, checks, stepping, and fine-tuning's new group.

Adding a group. PyTorch schedulers keep one entry per parameter group (``base_lrs``, LambdaLR's ``lr_lambdas``,
OneCycleLR's ``max_lr`` in each group, ...), filled when they are constructed. A group added
later with ``optimizer.add_param_group`` (as :meth:`Trainer.unfreeze_features` does) is then
either silently left unscheduled or crashes the next ``scheduler.step()`` with a ``zip`` or
``KeyError``. :func:`adopt_new_group` gives the newest group the entries of a reference group,
scaled so that the new group starts at its own learning rate and then follows the same schedule.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ._arguments import check_learning_rate
from ._freeze import unfreeze_features

__all__ = [
    "adopt_new_group",
    "build_optimizer",
    "build_scheduler",
    "step_scheduler",
    "unfreeze_into",
]

# Per-group lists on scheduler objects. Learning rates are scaled to the new group; the others
# (schedule shapes and momenta) are shared as they are.
_SCALED_LISTS = ("base_lrs", "max_lrs", "min_lrs", "_last_lr")
_SHARED_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")
# Keys that schedulers write into each parameter group.
_SCALED_KEYS = ("initial_lr", "max_lr", "min_lr")
_SHARED_KEYS = ("max_momentum", "base_momentum")


def adopt_new_group(scheduler: Any, optimizer: torch.optim.Optimizer, *, like: int = 0) -> None:
    """Extend ``scheduler`` to the last group of ``optimizer``, modelled on group ``like``.

    Afterwards the new group's learning rate is ``ratio`` times group ``like``'s, where
    ``ratio`` is the two groups' ratio right now: the new group keeps the rate it was added
    with and is then decayed, warmed up or cycled by the same factors. (Exactly so for
    multiplicative schedules; an absolute floor such as CosineAnnealingLR's ``eta_min`` is
    shared, not scaled.) Schedulers nested in ``SequentialLR`` and ``ChainedScheduler`` are
    extended too. Does nothing for a scheduler that already covers every group.
    """
    groups = optimizer.param_groups
    new, model = groups[-1], groups[like]
    current = float(model["lr"])
    # A schedule can pass through zero (cosine to eta_min=0): fall back to the base rate then.
    reference = current if current > 0 else float(model.get("initial_lr", 0.0))
    ratio = float(new["lr"]) / reference if reference > 0 else 1.0
    for key in _SCALED_KEYS:
        if key in model and key not in new:
            new[key] = float(model[key]) * ratio
    for key in _SHARED_KEYS:
        if key in model and key not in new:
            new[key] = model[key]
    for part in _schedulers_in(scheduler):
        for name in _SCALED_LISTS + _SHARED_LISTS:
            values = getattr(part, name, None)
            if isinstance(values, list) and len(values) == len(groups) - 1:
                values.append(values[like] * ratio if name in _SCALED_LISTS else values[like])


def _schedulers_in(scheduler: Any) -> list[Any]:
    """``scheduler`` and, for SequentialLR / ChainedScheduler, the schedulers inside it."""
    found = [scheduler]
    for inner in getattr(scheduler, "_schedulers", None) or []:
        found.extend(_schedulers_in(inner))
    return found


def build_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, lr: float
) -> torch.optim.Optimizer:
    """``optimizer`` (warned about if it holds frozen parameters), or Adam over the trainable ones.

    Raises:
        ValueError: no parameter of ``model`` is trainable (for the default optimizer).
    """
    if optimizer is not None:  # its type was checked with the other arguments
        frozen = sum(1 for group in optimizer.param_groups for p in group["params"] if not p.requires_grad)
        if frozen:
            warnings.warn(
                f"Trainer: the optimizer holds {frozen} frozen parameters (requires_grad=False). "
                f"They are not trained now, but weight decay and momentum buffers are kept for "
                f"them, and they would train at the head's learning rate if unfrozen later. "
                f"HINT: build the optimizer from the trainable parameters only: "
                f"torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=...)",
                UserWarning,
                stacklevel=3,
            )
        return optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "Trainer: the model has no trainable parameters (every requires_grad is False); "
            "give it a new head with vt.replace_classifier(model, num_classes) or call "
            "vt.unfreeze_features(model)"
        )
    # The fused kernel updates all parameters in one pass: same arithmetic, about 4x less
    # time than the per-tensor loop for VGG16's 12.5M-parameter head on a CPU.
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr)


def build_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> Any:
    """``scheduler`` itself, or what it makes from ``optimizer`` when it is a factory."""
    if scheduler is None or hasattr(scheduler, "state_dict"):
        return scheduler
    made = scheduler(optimizer)
    if not (hasattr(made, "step") and hasattr(made, "state_dict")):
        raise TypeError(
            f"Trainer: the scheduler function returned {made!r}, not an LR scheduler; it should build "
            f"one for the optimizer it is given, e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5)"
        )
    return made


def step_scheduler(scheduler: Any, record: dict[str, float]) -> None:
    """Step ``scheduler`` after an epoch; ReduceLROnPlateau gets the validation (else training) loss."""
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(record.get("val_loss", record["train_loss"]))
    else:
        scheduler.step()


def unfreeze_into(
    network: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, lr: float | None, base_lr: float
) -> float:
    """Unfreeze ``network``'s features and train them as a new group of ``optimizer`` at ``lr``.

    ``lr`` defaults to a tenth of the head's current rate (of its base rate when a schedule
    sits at zero). ``scheduler`` learns of the new group (:func:`adopt_new_group`).

    Returns:
        The features' learning rate.
    """
    if lr is not None:
        lr = check_learning_rate(lr, "lr", "unfreeze_features")
    else:
        head = optimizer.param_groups[0]
        # A schedule can sit at zero (cosine annealing's end): then a tenth of its base rate.
        lr = (float(head["lr"]) or float(head.get("initial_lr", base_lr))) / 10
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    unfreeze_features(network)
    new = [p for p in network.parameters() if p.requires_grad and id(p) not in held]
    if new:
        optimizer.add_param_group({"params": new, "lr": lr})
        if scheduler is not None:
            adopt_new_group(scheduler, optimizer)
    return lr
