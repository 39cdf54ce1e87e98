"""The checkpoint file on disk: atomic writes, safe reads, and the checks every file gets.

A checkpoint is one ``torch.save`` file holding a dict of plain data and CPU tensors only, so it
loads with ``torch.load(..., weights_only=True)``::

    format           "vggtransfer.checkpoint"
    format_version   1
    model            state dict (all entries, or only the trainable ones when head_only)
    head_only        bool
    backbone_sha256  fingerprint of the frozen entries left out (head_only only)
    build            how vggtransfer built the model (arch, weights, head, freeze), or {}
    class_names      list of str, or None
    transform        ImageTransform settings, or None
    trainer          epoch, global_step, seed, optimizer/scheduler/scaler state, history,
                     early stopping, RNG states, precision, unfreeze learning rate

docs/checkpoints.md describes every field. What the fields must hold to fit a model is checked
in ``_checkpoint``; this module only guarantees a complete, safe, versioned file.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._state_dict import strip_wrapper_prefixes

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_save",
    "check_finite",
    "non_finite_entries",
    "read_checkpoint",
    "to_cpu",
]

FORMAT = "vggtransfer.checkpoint"
#: Incremented when the layout changes; files with a newer version are refused, not guessed at.
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, of an unknown version, or does not fit the model.

    The message says what differs. Nothing has been loaded when it is raised.
    """


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with ``torch.save`` so that ``path`` always holds a complete file.

    The data goes to a temporary file in the same folder, is flushed and fsynced, and then
    replaces ``path`` with ``os.replace`` (atomic on POSIX and Windows). A process killed at any
    instant leaves either the previous file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable across a power cut; not supported on every platform.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a checkpoint file with the safe unpickler, tensors onto the CPU.

    ``weights_only=True`` is passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot
    turn it off, and there is no fallback to the full unpickler.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a vggtransfer checkpoint of a known version, is
            truncated, or contains objects that need the full unpickler.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"refusing to load checkpoint {str(path)!r}: it contains objects that only the full "
            f"pickle loader can build, which could run arbitrary code ({first}). vggtransfer "
            f"checkpoints hold plain data and tensors only; this file was not written by "
            f"vggtransfer or has been tampered with"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: {exc}. The file is truncated or not a PyTorch file"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a vggtransfer checkpoint (format {found!r}, expected {FORMAT!r}); "
            f"for a plain state dict use vt.create_model(arch, weights=path)"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version!r}, but this vggtransfer reads "
            f"versions 1 to {FORMAT_VERSION}; upgrade vggtransfer to read it"
        )
    for key, kind in (("model", Mapping), ("build", Mapping), ("trainer", Mapping), ("head_only", bool)):
        if not isinstance(data.get(key), kind):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is damaged: field {key!r} should be a {kind.__name__} "
                f"but is {type(data.get(key)).__name__}"
            )
    data["model"] = strip_wrapper_prefixes(data["model"])
    return data


def non_finite_entries(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point entries holding NaN or infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise CheckpointError if any floating-point tensor in ``state`` is NaN or infinite."""
    bad = non_finite_entries(state)
    if bad:
        raise CheckpointError(
            f"{what} holds NaN or infinite values in {len(bad)} tensors (first: {bad[0]}); "
            f"refusing to use weights that would only produce NaN"
        )


def to_cpu(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)
