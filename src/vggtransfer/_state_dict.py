"""Reading state dicts safely and loading them all-or-nothing.

Two rules hold everywhere vggtransfer reads weights:

* Files are read with ``torch.load(..., weights_only=True)``, passed explicitly so that the
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable cannot downgrade it. A file that needs
  the full unpickler is refused without running anything in it.
* A state dict is compared with the model (keys and shapes) *before* any tensor is copied.
  ``nn.Module.load_state_dict(strict=True)`` copies every matching tensor and only then raises,
  which leaves a half-loaded model behind; checking first means an error changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "as_state_dict",
    "cpu_state_dict",
    "fingerprint",
    "load_exactly",
    "merge_into",
    "read_state_dict",
    "state_dict_differences",
    "strip_wrapper_prefixes",
]

# Wrappers that prefix every key: DataParallel / DistributedDataParallel add "module.",
# torch.compile's OptimizedModule adds "_orig_mod.". They may be stacked in either order.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``state_dict`` without the key prefixes added by DDP and ``torch.compile``.

    A prefix is removed only when *every* key carries it, so a model that happens to have a
    submodule named ``module`` keeps its keys.
    """
    result = dict(state_dict)
    changed = True
    while changed and result:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in result):
                result = {key[len(prefix) :]: value for key, value in result.items()}
                changed = True
    return result


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` state dict with the safe unpickler, onto the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a safe, tensor-only state dict.

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist; expected a path to a .pth file saved "
            f"with torch.save(model.state_dict(), path)"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The safe unpickler stops at the first object that is not plain data; nothing in the
        # file has run. Its own message names the offending global.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"refusing to load {str(path)!r}: it is not a plain tensor file and would need the "
            f"full pickle loader, which can run arbitrary code ({first_line}). Re-save it as a "
            f"state dict: torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # a damaged or foreign file: the unpickler raises anything
        raise ValueError(
            f"cannot read {str(path)!r} as a PyTorch file: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}. Expected a file written by "
            f"torch.save(model.state_dict(), path); it may be truncated or of another format"
        ) from None
    return as_state_dict(loaded, source=str(path))


def as_state_dict(obj: object, *, source: str) -> dict[str, torch.Tensor]:
    """Check that ``obj`` is a mapping of string keys to tensors and return it as a dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{source} holds a {type(obj).__name__}, expected a state dict (a mapping of "
            f"parameter names to tensors). Save one with torch.save(model.state_dict(), path)"
        )
    bad = [key for key, value in obj.items() if not (isinstance(key, str) and torch.is_tensor(value))]
    if bad:
        hint = ""
        if "state_dict" in obj or "model" in obj:
            hint = (
                "; it looks like a training checkpoint: load it with vt.load_model(path), or "
                "save its model weights alone"
            )
        raise ValueError(
            f"{source} is not a plain state dict: {len(bad)} entries are not tensors "
            f"(first: {bad[0]!r}){hint}"
        )
    return strip_wrapper_prefixes(obj)


def state_dict_differences(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> list[str]:
    """List, in words, how ``state_dict`` differs from ``expected`` in keys and shapes."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [
        f"{key}: model has {list(expected[key].shape)}, file has {list(state_dict[key].shape)}"
        for key in expected
        if key in state_dict and expected[key].shape != state_dict[key].shape
    ]
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    lines.extend(f"shape mismatch {item}" for item in reshaped[:5])
    if len(reshaped) > 5:
        lines.append(f"... and {len(reshaped) - 5} more shape mismatches")
    return lines


def load_exactly(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Copy ``state_dict`` into ``model`` only if keys and shapes match exactly.

    Raises:
        ValueError: the keys or shapes differ; the model is left untouched.

    """
    differences = state_dict_differences(model.state_dict(), state_dict)
    if differences:
        raise ValueError(
            f"the weights in {source} do not fit this model; nothing was loaded:\n  "
            + "\n  ".join(differences)
            + "\nBuild the same architecture and head as the file was saved from "
            "(e.g. the same arch and num_classes) before loading."
        )
    model.load_state_dict(state_dict, strict=True)


def merge_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` (every entry, or a subset such as the trained ones) with strict key checking."""
    merged = model.state_dict()
    merged.update(state)
    model.load_state_dict(merged, strict=True)


def cpu_state_dict(
    model: nn.Module, *, skip: set[str] | frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as CPU copies (so a CUDA checkpoint loads anywhere), minus ``skip``."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in skip}


def fingerprint(state: Mapping[str, torch.Tensor], keys: set[str]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``state[key]`` for ``keys``."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = state[key].detach().to("cpu")
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        # reshape(-1): a 0-d tensor (num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
