"""What loading a checkpoint checks, field by field, before anything is applied.

A checkpoint is hostile until validated: it may be damaged on disk, edited by hand, written by
another vggtransfer, or meant for another model. Each check here raises :class:`CheckpointError`
saying which field is wrong, what it holds and what was expected. ``read_resume`` and
``load_model`` run them all first, so a refused file changes nothing: no weights, no optimizer,
no counters. The same module turns what a Trainer saves into plain data (:func:`plain`), so
that every file ``save_checkpoint`` writes loads again.
"""

from __future__ import annotations

import math
import numbers
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ._checkpoint_file import CheckpointError, check_finite
from ._heads import output_count
from ._spec import build_spec
from ._state_dict import fingerprint, state_dict_differences

__all__ = [
    "check_against_live_states",
    "check_cache_views",
    "check_class_weights_fields",
    "check_identity",
    "check_model_state",
    "check_optimizer",
    "check_trainer_fields",
    "plain",
]

# Optimizer settings that differ between PyTorch releases rather than between optimizers: a
# group missing one of them is filled in by the optimizer's own __setstate__.
_VERSION_FLAGS = {
    "foreach",
    "maximize",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
    "param_names",
}


def plain(value: Any, where: str) -> Any:
    """``value`` as the plain data a ``weights_only`` checkpoint holds: numpy to Python, paths to str.

    Raises:
        TypeError: something no checkpoint can hold (an object, a set, a function), named by
            its place, e.g. ``extra['split']['train'][3]``.
    """
    if isinstance(value, np.generic):  # np.str_, np.float64, np.datetime64, ...: their Python value
        return plain(value.item(), where)
    if value is None or type(value) in (bool, str) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, str):  # a str subclass needs the full unpickler: keep the text only
        return str(value)
    if isinstance(value, np.ndarray):
        return plain(value.tolist(), where)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            key = plain(key, f"{where} key {key!r}")
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(
                    f"save_checkpoint: {where} has a key {key!r}; checkpoint keys must be str or numbers"
                )
            result[key] = plain(item, f"{where}[{key!r}]")
        return result
    if isinstance(value, (list, tuple)):
        items = [plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"save_checkpoint: {where} is a {type(value).__name__} ({value!r:.60}), which a checkpoint cannot "
        f"hold; store plain data (str, int, float, bool, None, lists, dicts, tensors), e.g. a list for a set"
    )


def check_identity(
    data: dict[str, Any], network: nn.Module, class_names: list[str] | None, *, source: str
) -> None:
    """Same architecture (or factory), one class name per output, the same names as the Trainer's."""
    saved_arch = data["build"].get("arch")
    my_arch = build_spec(network).get("arch")
    if saved_arch and my_arch and saved_arch != my_arch:
        raise CheckpointError(
            f"checkpoint {source!r} was saved from a {saved_arch!r} model but this model is a "
            f"{my_arch!r}; build the same architecture (vt.create_model({saved_arch!r}, ...)) or use "
            f"vt.load_model(path)"
        )
    saved_factory, my_factory = data["build"].get("factory"), build_spec(network).get("factory")
    if saved_factory and my_factory and saved_factory != my_factory:
        raise CheckpointError(
            f"checkpoint {source!r} was saved from a model built by the factory {saved_factory!r} but this "
            f"model was built by {my_factory!r}; build it with {saved_factory!r}"
        )
    saved_names = data.get("class_names")
    if saved_names is not None and not (
        isinstance(saved_names, list) and all(isinstance(name, str) for name in saved_names)
    ):
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: class_names should be a list of str but is {saved_names!r:.80}"
        )
    if saved_names is not None and len(set(saved_names)) != len(saved_names):
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: its class names {saved_names} repeat a name"
        )
    outputs = output_count(network)
    if saved_names is not None and len(saved_names) != outputs:
        raise CheckpointError(
            f"checkpoint {source!r} has {len(saved_names)} classes {saved_names} but this model has "
            f"{outputs} outputs; build it with vt.replace_classifier(model, {len(saved_names)})"
        )
    if saved_names is not None and class_names is not None and list(saved_names) != list(class_names):
        raise CheckpointError(
            f"checkpoint {source!r} has classes {saved_names} but this Trainer has {class_names}; "
            f"predictions would be misnamed"
        )


def check_model_state(data: dict[str, Any], network: nn.Module, frozen: set[str], *, source: str) -> None:
    """The weights fit ``network`` (keys and shapes; the frozen backbone's fingerprint) and are finite."""
    state = data["model"]
    bad = [
        key for key, value in state.items() if not (isinstance(key, str) and isinstance(value, torch.Tensor))
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: model entry {bad[0]!r} is not a named tensor"
        )
    current = network.state_dict()
    if data["head_only"]:
        if fingerprint(current, frozen) != data.get("backbone_sha256"):
            raise CheckpointError(
                f"checkpoint {source!r} holds only a head trained on a specific backbone "
                f"({data['build'].get('arch')}, weights {data['build'].get('weights')}), and this "
                f"model's frozen backbone differs from it; build the model with those weights"
            )
        current = {k: v for k, v in current.items() if k not in frozen}
    differences = state_dict_differences(current, state)
    differences += [
        f"dtype mismatch {key}: model has {current[key].dtype}, file has {value.dtype}"
        for key, value in state.items()
        if key in current and value.dtype != current[key].dtype
    ][:5]
    if differences:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit this model; nothing was loaded:\n  "
            + "\n  ".join(differences)
        )
    check_finite(state, what=f"checkpoint {source!r}")


def check_optimizer(
    optimizer: torch.optim.Optimizer, saved: Any, params: list[list[nn.Parameter]], *, source: str
) -> None:
    """The saved optimizer state fits ``optimizer`` whose groups will hold ``params``.

    Checked: the layout, the number of groups and parameters, the settings of each group (an
    Adam state does not fit SGD), and every state tensor's shape, dtype and finiteness: a
    wrong-shaped ``exp_avg`` would corrupt memory in the fused kernel, a NaN would surface
    epochs later as a NaN loss.
    """
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("state"), dict)
        and isinstance(saved.get("param_groups"), list)
    ):
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: its optimizer state is not an optimizer's state_dict"
        )
    groups = saved["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: an optimizer parameter group has no 'params' list"
        )
    sizes, saved_sizes = [len(p) for p in params], [len(g["params"]) for g in groups]
    if sizes != saved_sizes:
        raise CheckpointError(
            f"checkpoint {source!r} holds optimizer state for parameter groups of sizes {saved_sizes} "
            f"but this Trainer's optimizer would have {sizes}; build the Trainer with the same "
            f"optimizer and freezing as the one that saved it"
        )
    for group in groups:
        _check_group(optimizer, group, source)
    keys = _state_keys(optimizer)
    by_index = {
        index: param
        for group, ps in zip(groups, params, strict=True)
        for index, param in zip(group["params"], ps, strict=True)
    }
    for index, state in saved["state"].items():
        param = by_index.get(index)
        if param is None or not isinstance(state, dict):
            raise CheckpointError(
                f"checkpoint {source!r} is damaged: optimizer state for unknown parameter {index!r}"
            )
        if keys is not None and set(state) != keys:
            raise CheckpointError(
                f"checkpoint {source!r} does not fit this Trainer's {type(optimizer).__name__}: the state of "
                f"parameter {index} has {sorted(state)} where {sorted(keys)} are expected; nothing was loaded"
            )
        for name, value in state.items():
            _check_state_value(value, param, f"optimizer state {name!r} of parameter {index}", source)


def _check_group(optimizer: torch.optim.Optimizer, group: dict[str, Any], source: str) -> None:
    """One saved parameter group has the settings, of the same kinds, as the live optimizer's."""
    expected = set(optimizer.param_groups[0]) - {"params"} - _VERSION_FLAGS
    missing = sorted(expected - set(group))
    if missing:
        raise CheckpointError(
            f"checkpoint {source!r} holds the state of another kind of optimizer: its parameter "
            f"groups lack {missing}, which this Trainer's {type(optimizer).__name__} needs; build the "
            f"Trainer with the optimizer that saved it"
        )
    lr = group.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: an optimizer group has learning rate {lr!r}"
        )
    live = optimizer.param_groups[0]
    for key in sorted(expected):
        if not _same_kind(live[key], group[key]) or (isinstance(group[key], float) and group[key] < 0):
            raise CheckpointError(
                f"checkpoint {source!r} is damaged: its optimizer setting {key!r} is {group[key]!r:.60}, "
                f"where this {type(optimizer).__name__} has {live[key]!r:.60}"
            )


def _state_keys(optimizer: torch.optim.Optimizer) -> set[str] | None:
    """The per-parameter state entries ``optimizer``'s kind keeps (``exp_avg``, ...), found by one step of a twin.

    None when that cannot be found out (an optimizer that needs a closure, or other arguments).
    """
    probe = torch.zeros(2, requires_grad=True)
    settings = {
        k: v
        for k, v in optimizer.defaults.items()
        if k not in ("foreach", "fused", "capturable", "differentiable")
    }
    try:
        twin = type(optimizer)([probe], **settings)
        probe.grad = torch.ones_like(probe)
        twin.step()
    except Exception:  # any optimizer may be given; then only values are checked
        return None
    state = twin.state_dict()["state"]
    return set(state[0]) if state else None


def _check_state_value(value: Any, param: nn.Parameter, what: str, source: str) -> None:
    scalar = what.startswith("optimizer state 'step'")  # the step count is the only 0-d entry
    if isinstance(value, torch.Tensor):
        if scalar and (value.numel() != 1 or not (value >= 0).all()):
            raise CheckpointError(f"checkpoint {source!r} is damaged: {what} is {value!r:.60}")
        if not scalar and value.shape != param.shape:  # a 0-d exp_avg crashed the fused kernel
            raise CheckpointError(
                f"checkpoint {source!r} does not fit this model: {what} has shape {list(value.shape)} but "
                f"the parameter has {list(param.shape)}; nothing was loaded"
            )
        if not scalar and value.dtype != param.dtype:
            raise CheckpointError(
                f"checkpoint {source!r} is damaged: {what} is {value.dtype}, the parameter {param.dtype}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"checkpoint {source!r} holds NaN or infinite values in {what}; resuming would train on "
                f"them. Resume from an earlier checkpoint"
            )
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"checkpoint {source!r} is damaged: {what} is {value!r:.60}")


def _count(value: Any, name: str, source: str, *, limit: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 0
        or (limit is not None and value >= limit)
    ):
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: trainer field {name!r} should be an int >= 0 but is {value!r:.60}"
        )
    return value


def check_cache_views(saved: Mapping[str, Any], cache_views: int | None, *, source: str) -> None:
    """The checkpoint was trained with this Trainer's ``cache_views`` (older files: None)."""
    if saved.get("cache_views") != cache_views:
        # Which view each image trains on depends on K: resuming with another K would not
        # continue the run that was saved.
        raise CheckpointError(
            f"checkpoint {source!r} was trained with cache_views={saved.get('cache_views')!r:.60} but this "
            f"Trainer has cache_views={cache_views!r}; build the Trainer with "
            f"cache_views={saved.get('cache_views')!r:.60} to resume it"
        )


def check_class_weights_fields(
    saved: Mapping[str, Any], setting: str | list[float] | None, *, source: str
) -> None:
    """The checkpoint was trained with this Trainer's ``class_weights`` (older files: None), and its weights in effect are sound."""
    if saved.get("class_weights") != setting:
        # Another weighting trains towards another objective: that is a new run, not this one resumed.
        raise CheckpointError(
            f"checkpoint {source!r} was trained with class_weights={saved.get('class_weights')!r:.80} but "
            f"this Trainer has class_weights={setting!r:.80}; build the Trainer with "
            f"class_weights={saved.get('class_weights')!r:.80} to resume it"
        )
    weights = saved.get("class_weights_in_effect")
    if weights is not None and not (
        isinstance(weights, list)
        and weights
        and all(type(w) in (int, float) and math.isfinite(w) and w >= 0 for w in weights)
    ):
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: trainer field 'class_weights_in_effect' is not a list "
            f"of finite numbers >= 0 but {weights!r:.80}"
        )


def check_trainer_fields(saved: Mapping[str, Any], network: nn.Module, *, source: str) -> None:
    """Counters, seed, history, best epoch, learning rates, scaler, scheduler and RNG states."""
    _count(saved.get("epoch"), "epoch", source)
    _count(saved.get("global_step"), "global_step", source)
    _count(saved.get("seed"), "seed", source, limit=2**63)
    history = saved.get("history")
    records = history.get("records") if isinstance(history, dict) else None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in r.items())
        for r in records
    ):
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: trainer field 'history' is not a list of epoch records"
        )
    unfreeze_lr = saved.get("unfreeze_lr")
    if unfreeze_lr is not None and (
        isinstance(unfreeze_lr, bool) or not isinstance(unfreeze_lr, (int, float)) or not unfreeze_lr > 0
    ):
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: trainer field 'unfreeze_lr' is {unfreeze_lr!r:.60}"
        )
    _check_best(saved.get("best"), network, source)
    for name in ("scheduler", "scaler"):
        if saved.get(name) is not None and not isinstance(saved[name], dict):
            raise CheckpointError(
                f"checkpoint {source!r} is damaged: trainer field {name!r} is not a state dict"
            )
    _check_rng(saved.get("rng"), source)


def _check_best(best: Any, network: nn.Module, source: str) -> None:
    if not (isinstance(best, dict) and {"value", "epoch", "wait", "state"} <= set(best)):
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: trainer field 'best' lacks value, epoch, wait or state"
        )
    value = best["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise CheckpointError(f"checkpoint {source!r} is damaged: the best value is {value!r:.60}")
    if best["epoch"] is not None:
        _count(best["epoch"], "best epoch", source)
    _count(best["wait"], "best wait", source)
    state = best["state"]
    if state is None:
        return
    current = network.state_dict()
    if not isinstance(state, dict) or any(
        key not in current or not isinstance(tensor, torch.Tensor) or tensor.shape != current[key].shape
        for key, tensor in state.items()
    ):
        raise CheckpointError(
            f"checkpoint {source!r} is damaged: the best epoch's weights do not fit this model"
        )
    check_finite(state, what=f"checkpoint {source!r}: the best epoch's weights")


def _check_rng(rng: Any, source: str) -> None:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {source!r} is damaged: its random-number state {what}")

    if not isinstance(rng, dict):
        raise bad("is missing")
    torch_state = rng.get("torch")
    if not (
        isinstance(torch_state, torch.Tensor)
        and torch_state.dtype == torch.uint8
        and torch_state.shape == torch.get_rng_state().shape
    ):
        raise bad("for torch is not a uint8 tensor of the generator's size")
    cuda = rng.get("cuda", [])
    if not (
        isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
    ):
        raise bad("for CUDA is not a list of uint8 tensors")
    python = rng.get("python")
    if not (
        isinstance(python, (list, tuple)) and len(python) == 3 and isinstance(python[0], int)
        and isinstance(python[1], (list, tuple)) and len(python[1]) == 625
        and all(isinstance(x, int) and 0 <= x < 2**32 for x in python[1])
        and (python[2] is None or isinstance(python[2], float))
    ):  # fmt: skip
        raise bad("for Python's random module is malformed")
    numpy_state = rng.get("numpy")
    if not isinstance(numpy_state, dict):
        raise bad("for NumPy is missing")
    keys = numpy_state.get("keys")
    if not (
        isinstance(keys, torch.Tensor) and keys.shape == (624,) and not keys.is_floating_point()
        and bool(((keys >= 0) & (keys < 2**32)).all())
        and isinstance(numpy_state.get("pos"), int) and 0 <= numpy_state["pos"] <= 624
        and numpy_state.get("has_gauss") in (0, 1)
        and isinstance(numpy_state.get("cached_gaussian"), (int, float))
    ):  # fmt: skip
        raise bad("for NumPy is malformed")
    # Structure is not enough (an all-zero Mersenne Twister state is invalid): set each state on
    # a generator of its own, which raises what restoring the global ones later would.
    try:
        torch.Generator().set_state(torch_state)
        random.Random().setstate((python[0], tuple(python[1]), python[2]))
        np.random.RandomState().set_state(
            ("MT19937", keys.numpy().astype(np.uint32), numpy_state["pos"], numpy_state["has_gauss"],
             numpy_state["cached_gaussian"])
        )  # fmt: skip
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise bad(f"cannot be restored ({type(exc).__name__}: {exc})") from None


def check_against_live_states(saved: Mapping[str, Any], scheduler: Any, scaler: Any, *, source: str) -> None:
    """The saved scheduler and scaler states have the entries, and kinds of values, of the live ones.

    ``load_state_dict`` of a scheduler or a GradScaler copies whatever it is given, and a wrong
    entry fails only later, inside ``fit``; comparing with the live objects' own state finds it
    before anything is applied.
    """
    if (scheduler is None) != (saved.get("scheduler") is None):
        raise CheckpointError(
            f"checkpoint {source!r} was saved "
            + ("with" if scheduler is None else "without")
            + " an LR scheduler, but this Trainer has "
            + ("none" if scheduler is None else f"a {type(scheduler).__name__}")
            + "; build the Trainer like the one that saved it, or its schedule would be lost"
        )
    for name, live in (("scheduler", scheduler), ("scaler", scaler)):
        state = saved.get(name)
        if live is None or not state:
            continue
        expected = live.state_dict()
        for key, value in expected.items():
            if key not in state:
                raise CheckpointError(
                    f"checkpoint {source!r} holds a {name} state without {key!r}: it was saved with another "
                    f"kind of {name} than this Trainer's {type(live).__name__}; build the Trainer like the original"
                )
            if not _same_kind(value, state[key]):
                raise CheckpointError(
                    f"checkpoint {source!r} is damaged: its {name} state {key!r} is {state[key]!r:.60}, where "
                    f"a {type(value).__name__} was expected"
                )


def _same_kind(expected: Any, found: Any) -> bool:
    if expected is None or callable(expected):
        return True
    if isinstance(expected, bool):
        return isinstance(found, bool)
    if isinstance(expected, numbers.Real):
        return (
            isinstance(found, numbers.Real)
            and not isinstance(found, bool)
            and (math.isfinite(found) or found == expected)  # ReduceLROnPlateau's mode_worse is inf
        )
    if isinstance(expected, (list, tuple)):
        return isinstance(found, (list, tuple))
    if isinstance(expected, dict):
        return isinstance(found, dict)
    return isinstance(found, type(expected))
