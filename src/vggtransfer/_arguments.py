"""Checks for the values users pass to the Trainer, made where they enter and before anything changes.

Each check returns the value in the form the library uses (a numpy integer becomes an ``int``, a
tuple of names a list) or raises: ``TypeError`` for a wrong kind, ``ValueError`` for a wrong value.
Messages name the argument, what was found, what is allowed and how to fix it.
"""

from __future__ import annotations

import math
import numbers
import os
import secrets
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ._callbacks import Callback, check_callbacks
from ._class_weights import check_class_weights
from ._heads import known_output_count
from ._runtime import unwrap

__all__ = [
    "check_callable",
    "check_class_names",
    "check_epochs",
    "check_learning_rate",
    "check_optimizer_argument",
    "check_cache_dir",
    "check_optional_path",
    "check_positive_int",
    "check_scheduler",
    "check_seed",
    "check_single_output",
    "check_trainer_inputs",
    "check_workers",
]

_SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64-bit seeds; derived seeds stay below this


def _integer(value: object) -> int | None:
    """``value`` as an int if it is an integer (numpy's too), else None; a bool is never a count."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


def _at_least(value: object, minimum: int, expected: str, too_small: str) -> int:
    """``value`` as an int >= ``minimum``; the messages start with ``expected`` / ``too_small``."""
    number = _integer(value)
    if number is None:
        raise TypeError(f"{expected} but got {value!r} ({type(value).__name__})")
    if number < minimum:
        raise ValueError(f"{too_small} but got {value!r}")
    return number


def check_positive_int(value: object, name: str, caller: str, *, limit: int = 2**31) -> int:
    """``value`` as an int in ``[1, limit]`` (numpy integers accepted)."""
    expected = f"{caller}: expected {name} to be a positive int"
    number = _at_least(value, 1, expected, f"{expected} (1 or more)")
    if number > limit:
        raise ValueError(f"{caller}: expected {name} to be at most {limit} but got {value!r}")
    return number


def check_workers(value: object, caller: str) -> int | None:
    """``num_workers``: None (one per usable core but one) or an int >= 0."""
    if value is None:
        return None
    number = _at_least(
        value,
        0,
        f"{caller}: expected num_workers to be None (automatic) or an int >= 0",
        f"{caller}: expected num_workers to be None or an int >= 0",
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if number > max(64, 8 * cores):  # each is a process with a copy of the dataset: memory runs out first
        raise ValueError(
            f"{caller}: num_workers={number} loader processes for {cores} usable cores would exhaust memory; "
            f"use at most {max(64, 8 * cores)}, or None for one per core"
        )
    return number


def check_learning_rate(value: object, name: str = "lr", caller: str = "Trainer") -> float:
    """A finite learning rate > 0 as a float (numpy floats accepted)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{caller}: expected {name} to be a number such as 1e-3 but got {value!r} ({type(value).__name__})"
        )
    rate = float(value)
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(
            f"{caller}: expected {name} to be a finite number > 0 such as 1e-3 but got {value!r}"
        )
    return rate


def check_seed(value: object, caller: str = "Trainer") -> int | None:
    """None (draw one) or an int in [0, 2**63) (numpy integers accepted)."""
    if value is None:
        return None
    seed = _integer(value)
    if seed is None:
        raise TypeError(
            f"{caller}: expected seed to be None or an int in [0, 2**63) but got {value!r} ({type(value).__name__})"
        )
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"{caller}: expected seed to be an int in [0, 2**63) but got {seed}")
    return seed


def check_class_names(value: object, outputs: int | None) -> list[str] | None:
    """None, or distinct strings, one per model output (a numpy array of strings accepted).

    Raises:
        TypeError: a single string (``"cats"`` would become four names), or non-string names.
        ValueError: duplicate names, or not one name per output.
    """
    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays hold numpy strings
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"Trainer: expected class_names to be a list of strings, one per class, such as "
            f"['cat', 'dog'], but got {value!r}"
        )
    bad = [name for name in value if not isinstance(name, str)]
    if bad:
        raise TypeError(
            f"Trainer: expected every class name to be a str but got {bad[0]!r} ({type(bad[0]).__name__})"
        )
    names = [str(name) for name in value]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"Trainer: class_names must be distinct but {duplicates} appear more than once in {names}"
        )
    if outputs is not None and len(names) != outputs:
        raise ValueError(
            f"Trainer: got {len(names)} class_names {names} but the model has {outputs} outputs; give one "
            f"name per output, or build the head with vt.replace_classifier(model, {len(names)})"
        )
    return names


def check_callable(value: object, name: str, example: str) -> None:
    """``value`` is None or callable."""
    if value is not None and not callable(value):
        raise TypeError(f"Trainer: expected {name} to be callable, such as {example}, but got {value!r}")


def check_scheduler(value: object) -> None:
    """None, an LR scheduler (something with ``step`` and ``state_dict``), or a factory of one."""
    if value is None or callable(value) or (hasattr(value, "step") and hasattr(value, "state_dict")):
        return
    raise TypeError(
        f"Trainer: expected scheduler to be a torch LR scheduler, a function that makes one from the "
        f"optimizer (e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5)), or None, but got {value!r}"
    )


def check_optimizer_argument(value: object) -> None:
    """None or a ``torch.optim.Optimizer``."""
    if value is not None and not isinstance(value, torch.optim.Optimizer):
        raise TypeError(
            f"Trainer: expected optimizer to be a torch.optim.Optimizer or None but got {value!r}; build "
            f"one, e.g. torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01), or "
            f"leave it out for Adam at lr"
        )


def check_epochs(value: object) -> int:
    """``fit``'s ``epochs``: the total to reach, an int >= 0."""
    expected = "fit: expected epochs to be an int >= 0 (the total to reach)"
    return _at_least(value, 0, expected, expected)


def check_optional_path(value: object, name: str, caller: str) -> Path | None:
    """None or a path (str or os.PathLike) as a ``Path``."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{caller}: expected {name} to be a path (str or os.PathLike) or None but got {value!r}"
        )
    return Path(value)


def check_cache_dir(value: object, caller: str) -> Path | None:
    """None, or a path that is a folder or can become one (not an existing file)."""
    folder = check_optional_path(value, "cache_dir", caller)
    if folder is not None and folder.exists() and not folder.is_dir():
        raise ValueError(
            f"{caller}: expected cache_dir to be a folder but {str(folder)!r} is a file; pass a "
            f"folder's path (it is created if missing), or None for the default cache folder"
        )
    return folder


def check_single_output(loss_fn: object, outputs: int | None) -> None:
    """Refuse a one-output model with the default cross-entropy, whose loss is 0 whatever it predicts."""
    if loss_fn is None and outputs == 1:
        raise ValueError(
            "Trainer: the model has 1 output, and the default loss (cross-entropy over the outputs) "
            "is then 0 for every input, so nothing would be learnt. For two classes build 2 outputs "
            "with vt.replace_classifier(model, 2); to train one logit, pass your own loss_fn (e.g. "
            "one that applies nn.BCEWithLogitsLoss to logits[:, 0] and float targets)"
        )


def check_trainer_inputs(
    model: object,
    *,
    optimizer: object,
    lr: object,
    loss_fn: object,
    scheduler: object,
    class_names: object,
    transform: object,
    seed: object,
    class_weights: object = None,
    callbacks: object = (),
) -> tuple[float, int, list[str] | None, Literal["balanced"] | list[float] | None, list[Callback]]:
    """Every plain Trainer argument checked, before the Trainer touches the model or the process.

    Returns:
        ``(lr, seed, class_names, class_weights, callbacks)`` normalised: a float, an int (drawn
        when None), a list or None, ``"balanced"`` or a list of floats or None, a list.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Trainer: expected model to be an nn.Module but got {type(model).__name__}")
    check_optimizer_argument(optimizer)
    rate = check_learning_rate(lr)
    check_callable(loss_fn, "loss_fn", "nn.CrossEntropyLoss()")
    check_callable(transform, "transform", "vt.imagenet_transform()")
    check_scheduler(scheduler)
    outputs = known_output_count(unwrap(model))  # None: the user's own model, trusted as it is
    check_single_output(loss_fn, outputs)
    names = check_class_names(class_names, outputs)
    checked = check_seed(seed)
    weights = check_class_weights(class_weights, loss_fn=loss_fn, outputs=outputs, class_names=names)
    hooks = check_callbacks(callbacks)
    return rate, checked if checked is not None else secrets.randbits(62), names, weights, hooks
