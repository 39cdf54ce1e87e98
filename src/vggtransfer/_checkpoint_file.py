"""The checkpoint file on disk: atomic writes, safe reads, and the checks every file gets.

A checkpoint is one ``torch.save`` file holding a dict of plain data and CPU tensors only, so it
loads with ``torch.load(..., weights_only=True)``::

    format           "vggtransfer.checkpoint"
    format_version   2 (1: the same without checksum, still read)
    model            state dict (all entries, or only the trainable ones when head_only)
    head_only        bool
    backbone_sha256  fingerprint of the frozen entries left out (head_only only)
    build            how vggtransfer built the model (arch, weights, head, freeze), or {}
    class_names      list of str, or None
    transform        ImageTransform settings, or None
    extra            the user's plain data (a data split, ...)
    trainer          epoch, global_step, seed, optimizer/scheduler/scaler state, history,
                     early stopping, RNG states, precision, unfreeze learning rate
    checksum         SHA-256 over every tensor above (:func:`tensor_checksum`)

docs/checkpoints.md describes every field. What the fields must hold to fit a model is checked
in ``_checkpoint_checks``; this module guarantees a complete, safe, versioned, intact file.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ._state_dict import strip_wrapper_prefixes

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "check_finite",
    "non_finite_entries",
    "read_checkpoint",
    "tensor_checksum",
    "to_cpu",
]

FORMAT = "vggtransfer.checkpoint"
#: Incremented when the layout changes; files with a newer version are refused, not guessed at.
#: 2 added ``checksum``, a SHA-256 over all tensor data, checked on every read.
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, of an unknown version, or does not fit the model.

    The message says what differs. Nothing has been loaded when it is raised.
    """


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with ``torch.save`` so that ``path`` always holds a complete file.

    The data goes to a temporary file in the same folder, is flushed and fsynced, and then
    replaces ``path`` with ``os.replace`` (atomic on POSIX and Windows). A process killed at any
    instant leaves either the previous file or the new one, never a torn one; a failed write
    leaves the previous file and no temporary one.

    Raises:
        OSError: the folder cannot be written, or the disk is full (``errno.ENOSPC``, with the
            path and the space needed in the message).
    """

    def write(raw: Any) -> None:
        file = _Recording(raw)
        try:
            torch.save(obj, file)  # type: ignore[arg-type]  # a file-like writer
        except RuntimeError:
            # torch reports a failed write as "unexpected pos"; the file's own OSError says why.
            if file.error is not None:
                raise file.error from None
            raise

    return atomic_write(Path(path), write, "a checkpoint", lambda: _tensor_bytes(obj))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) so that ``path`` always holds a complete file, as :func:`atomic_save`."""
    data = text.encode("utf-8")
    return atomic_write(Path(path), lambda raw: raw.write(data), "a file", lambda: len(data))


def atomic_write(
    path: Path, write: Callable[[Any], Any], what: str, size: Callable[[], int] | None = None
) -> Path:
    """Write through ``write(binary_file)`` into a temporary file, then replace ``path`` with it.

    The one writer behind every file vggtransfer saves: fsynced, given the usual permissions,
    never leaving a temporary file, and on a full disk an error that says how much was needed
    (``size``, in bytes, when known).
    """
    if path.exists() and not path.is_file():  # a folder, a FIFO, /dev/null: never replaced by a file
        raise FileExistsError(
            errno.EEXIST,
            f"{str(path)!r} exists and is not a regular file; refusing to replace it with {what}",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            write(raw)
            raw.flush()
            os.fsync(raw.fileno())
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                exc.errno,
                f"no space left to write {str(path)!r}: "
                + (f"it needs about {size() / 1e6:.1f} MB and " if size is not None else "")
                + f"{shutil.disk_usage(path.parent).free / 1e6:.1f} MB are free. The previous file "
                f"is kept and no partial file was left; free some space or save elsewhere",
            ) from None
        raise
    _fsync_directory(path.parent)
    return path


class _Recording:
    """A binary file that remembers the OSError of a failed write (torch hides it)."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.file.write(data))
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _tensor_bytes(obj: Any) -> int:
    """Bytes of tensor data in nested dicts, lists and tuples: what a file of ``obj`` needs at least."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def tensor_checksum(data: Any) -> str:
    """SHA-256 over every tensor in ``data`` (nested dicts and lists): names, dtypes, shapes and bytes.

    The ``"checksum"`` entry of the top-level dict is left out, so the result can be stored there.
    """
    digest = hashlib.sha256()

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            digest.update(f"{where}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                if not (where == "" and key == "checksum"):
                    walk(value[key], f"{where}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}/{i}")

    walk(data, "")
    return digest.hexdigest()


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
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():  # a folder, a FIFO (reading would block), a device
        raise CheckpointError(f"checkpoint {str(path)!r} is not a regular file; give the path of a .pt file")
    other = _sniff(path)
    if other is not None:
        raise CheckpointError(
            f"{str(path)!r} is not a vggtransfer checkpoint: it is {other}, not a file written by "
            f"torch.save. Checkpoints come from Trainer.save_checkpoint (e.g. runs/pets/best.pt)"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names what the safe unpickler refused on a line of its own; the rest is boilerplate.
        refused = [
            line.strip()
            for line in str(exc).splitlines()
            if line.strip().startswith("WeightsUnpickler error: ")
        ]
        raise CheckpointError(
            f"refusing to load checkpoint {str(path)!r}: the safe loader cannot read it"
            + (f" ({refused[0]})" if refused else "")
            + ". Either it holds objects that only the full pickle loader can build, which could run "
            "arbitrary code, or it is damaged. vggtransfer checkpoints hold plain data and tensors "
            "only; this file was not written by vggtransfer, or has been damaged or tampered with"
        ) from None
    except Exception as exc:  # the unpickler of a damaged file raises anything: KeyError, IndexError, ...
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]  # torch's first sentence
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}: {first}); the file is truncated, "
            f"damaged or not a PyTorch file. Use another copy, or the last.pt / best.pt beside it"
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
    if version >= 2 and data.get("checksum") != tensor_checksum(data):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupted: its tensor data does not match the checksum "
            f"recorded when it was saved (a disk or copy error, or an edit, changed it); nothing was "
            f"loaded. Use another copy, or the last.pt / best.pt beside it"
        )
    data["model"] = strip_wrapper_prefixes(data["model"])
    return data


# How other files begin, to name what was given instead of a checkpoint. torch.save writes a zip
# archive (PK\x03\x04), or a pickle (\x80) in its legacy format.
_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image, WAV audio)"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
)


def _sniff(path: Path) -> str | None:
    """What ``path`` is when it is certainly not a torch.save file, else None."""
    with path.open("rb") as file:
        head = file.read(512)
    if not head:
        return "empty (0 bytes)"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return None
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if text.startswith((b"{", b"[")):
        return "JSON or other text"
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return "a text file"
    return "not a PyTorch file (unknown binary data)"


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
