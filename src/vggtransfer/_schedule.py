"""Telling an LR scheduler about a parameter group added after it was built.

PyTorch schedulers keep one entry per parameter group (``base_lrs``, LambdaLR's ``lr_lambdas``,
OneCycleLR's ``max_lr`` in each group, ...), filled when they are constructed. A group added
later with ``optimizer.add_param_group`` (as :meth:`Trainer.unfreeze_features` does) is then
either silently left unscheduled or crashes the next ``scheduler.step()`` with a ``zip`` or
``KeyError``. :func:`adopt_new_group` gives the newest group the entries of a reference group,
scaled so that the new group starts at its own learning rate and then follows the same schedule.
"""

from __future__ import annotations

from typing import Any

import torch

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
