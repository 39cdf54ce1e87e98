"""Where cached features live: in memory, or in memory-mapped files in a cache folder.

A :class:`FeatureSet` holds the inputs of a classifier head for every sample of a dataset, in
dataset order. :func:`compute_features` fills one in a single pass of the frozen network; sets
larger than the memory budget go to a disk *entry* of three files in the cache folder, which later
runs with the same key reopen with :func:`open_features`:

- ``KEY.bin``: the features, float32, C order, no header;
- ``KEY.targets.pt``: the targets, an int64 tensor saved with ``torch.save``;
- ``KEY.json``: ``{"shape": [N, ...], "dtype": "float32"}``, the marker of a complete entry.

Writing is safe against other processes, kills and full disks:

- Each writer uses its own temporary names: ``KEY.<pid>.<random>.tmp`` (the features),
  ``KEY.<pid>.<random>.targets.tmp`` and ``KEY.<pid>.<random>.json.tmp``. The features file is
  created exclusively and reserved at its full size first (``os.posix_fallocate``, else written
  with zeros), so a full disk is an error (:class:`CacheSpaceError`, nothing left behind) before
  the feature pass goes on; rows are then written with ``pwrite``, never through a memory map,
  which on a full disk kills the process with SIGBUS. The file is ``flock``-ed for as long as its
  writer lives, which tells :func:`prune_caches` that it is in use.
- Publishing happens under an exclusive lock on ``KEY.lock``: if a complete, valid entry is
  already there, the first complete writer has won and this one deletes its temporaries and
  opens that entry; otherwise ``os.replace`` moves ``.bin``, then ``.targets.pt``, then the
  ``.json`` marker into place. So the three files of an entry always come from one writer, and a
  process killed at any instant leaves at most temporaries and marker-less files, never used.
- Readers hold a shared lock on ``KEY.lock`` while they check and open an entry; deleting an
  entry (damaged, pruned) takes the exclusive lock and removes the ``.json`` first. The holder of
  an exclusive lock removes the lock file when done; whoever locks a lock file checks it is still
  the one in the folder, so removing it is safe. (Without ``fcntl``, on Windows, nothing is
  locked: temporaries are still unique and renamed, but two writers of one key may interleave.)
- Opening checks the entry as hostile input: valid JSON with a shape of positive integers and
  dtype float32, a ``.bin`` of exactly that many bytes, readable int64 targets, one per sample.
  A damaged entry is reported with a warning, its files deleted, and the features computed
  again.

The folder is kept under ``$VGGTRANSFER_CACHE_LIMIT_GB`` by :func:`prune_caches`, least recently
used first; it also removes what killed writers left behind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import secrets
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ._heads import locate_head

if sys.platform != "win32":
    import fcntl

__all__ = [
    "KEY_NAME",
    "CacheSpaceError",
    "FeatureSet",
    "cache_limit_bytes",
    "compute_features",
    "default_cache_dir",
    "drop_cache",
    "memory_budget",
    "open_features",
    "prune_caches",
]


def default_cache_dir() -> Path:
    """``$VGGTRANSFER_CACHE``, else ``~/.cache/vggtransfer/features``."""
    # An empty value means unset, not the working directory.
    return Path(os.environ.get("VGGTRANSFER_CACHE") or Path.home() / ".cache" / "vggtransfer") / "features"


def cache_limit_bytes() -> int:
    """Disk space the feature caches of one folder may take: ``$VGGTRANSFER_CACHE_LIMIT_GB``, else 50 GB."""
    raw = os.environ.get("VGGTRANSFER_CACHE_LIMIT_GB", "50")
    try:
        gigabytes = float(raw)
        if not gigabytes >= 0 or math.isinf(gigabytes):  # NaN, negative (would prune everything), inf
            raise ValueError(raw)
    except ValueError:
        raise ValueError(
            f"VGGTRANSFER_CACHE_LIMIT_GB must be a number of gigabytes (like 50 or 0.5) but is {raw!r}"
        ) from None
    return int(gigabytes * 1e9)


def memory_budget(device: torch.device) -> int:
    """Bytes of features to keep in memory before using a memory-mapped file instead.

    ``$VGGTRANSFER_CACHE_MEMORY_GB`` sets it (0 = always on disk, for machines with little
    memory); by default 30% of a GPU's free memory, or 40% of the RAM up to 8 GB.
    """
    raw = os.environ.get("VGGTRANSFER_CACHE_MEMORY_GB")
    if raw is not None:
        try:
            gigabytes = float(raw)
        except ValueError:
            gigabytes = -1.0
        if not gigabytes >= 0 or math.isinf(gigabytes):  # also refuses NaN
            raise ValueError(
                f"VGGTRANSFER_CACHE_MEMORY_GB must be a number of gigabytes >= 0 (like 8, or 0 to keep "
                f"every feature cache on disk) but is {raw!r}"
            )
        return int(gigabytes * 1e9)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.3)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return min(8 << 30, int(total * 0.4))


class CacheSpaceError(OSError):
    """No room on the disk for a feature cache; ``errno`` is ``ENOSPC`` or ``EDQUOT``.

    Nothing of the new cache is left behind, and the folder's other caches are kept.
    """


# The files of one cache entry, beside ``KEY.bin``; ``.json`` is written last and marks it complete.
# ``.tmp`` files are a writer's temporaries, ``.lock`` the entry's lock file.
_ENTRY_SUFFIXES = (".bin", ".json", ".targets.pt", ".tmp", ".lock")
KEY_NAME = re.compile(r"[0-9a-f]{32}")  # cache_key() and one-off names: 32 hex digits
_STALE_TMP_S = 24 * 3600  # without file locks, a .tmp this old is from a run that was killed
# A .tmp nobody has locked is a killed writer's (a writer locks its features file as it creates
# it, and its other temporaries live for the milliseconds of publishing), once it is this old.
_ORPHAN_TMP_S = 60
_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_FULL_DISK = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

_LockState = Literal["locked", "busy", "unsupported"]


def _flock(fd: int, *, shared: bool = False, blocking: bool = True) -> bool:
    """Lock the open file ``fd``; False if ``blocking`` is off and another holds it."""
    if sys.platform == "win32":  # pragma: no cover - see the module docstring
        return True
    flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, flags)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def _entry_lock(store: Path, *, shared: bool = False, blocking: bool = True) -> Iterator[_LockState]:
    """Hold the lock file ``KEY.lock`` of the entry ``store``.

    Yields ``"locked"``, ``"busy"`` (not ``blocking``, and another holds it) or ``"unsupported"``
    (no ``fcntl``, or a read-only folder: the caller goes on unlocked).
    """
    path = store.with_suffix(".lock")
    if sys.platform == "win32":  # pragma: no cover
        yield "unsupported"
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                yield "unsupported"
                return
        except OSError:  # a read-only cache folder still serves its caches
            yield "unsupported"
            return
        try:
            acquired = _flock(fd, shared=shared, blocking=blocking)
        except OSError:  # a file system without locks
            os.close(fd)
            yield "unsupported"
            return
        if not acquired:
            os.close(fd)
            yield "busy"
            return
        # Its last holder may have removed it before we locked it: lock the file in the folder.
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield "locked"
    finally:
        # Remove the lock file when nobody else holds it (removing a locked file is safe: see above).
        if shared:
            with contextlib.suppress(OSError):
                shared = not _flock(fd, blocking=False)
        if not shared:
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)


def _in_use(path: Path) -> bool | None:
    """Whether a writer holds ``path`` locked; None when that cannot be told."""
    if sys.platform == "win32":  # pragma: no cover
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        return not _flock(fd, blocking=False)
    except OSError:
        return None
    finally:
        os.close(fd)  # also releases the lock taken just to test


def prune_caches(folder: Path, *, keep: Path, limit_bytes: int) -> list[Path]:
    """Delete the least recently used feature caches in ``folder`` until they fit ``limit_bytes``.

    Use is the modification time of an entry's ``.json`` (:func:`open_features` touches it).
    ``keep`` (the cache just written) is never deleted, nor is an entry another run is opening or
    writing now (its lock is held). What killed writers left is deleted: a ``.tmp`` that no
    writer holds locked (a minute after it was last written; without file locks, a day), and
    ``.bin`` or ``.targets.pt`` files without a ``.json``. A run that still has a deleted cache
    mapped keeps reading it (POSIX unlinks the name, not the open file). Returns the deleted files.
    """
    entries: dict[str, list[Path]] = {}
    temporaries: list[Path] = []
    for path in folder.glob("*"):
        stem = path.name.split(".", 1)[0]
        # Only files named like a cache key: a shared cache_dir may hold other files.
        if not (KEY_NAME.fullmatch(stem) and path.name.endswith(_ENTRY_SUFFIXES) and path.is_file()):
            continue
        if path.name.endswith(".tmp"):
            temporaries.append(path)
        else:
            entries.setdefault(stem, []).append(path)
    deleted: list[Path] = []
    now = time.time()
    for path in temporaries:
        age = now - (_mtime_or_none(path) or now)
        in_use = _in_use(path)
        if (in_use is False and age > _ORPHAN_TMP_S) or (in_use is None and age > _STALE_TMP_S):
            deleted += _unlink([path])
    keep_stem = keep.name.split(".", 1)[0]
    total = 0
    complete = []
    for stem, files in entries.items():
        store = folder / f"{stem}.bin"
        data = [p for p in files if not p.name.endswith(".lock")]
        size = sum(_size(path) for path in data)
        used = _mtime_or_none(folder / f"{stem}.json")
        if stem == keep_stem:
            total += size
        elif used is None:  # no .json: being published now, or left by a killed run
            with _entry_lock(store, blocking=False) as state:
                if state == "locked" and not store.with_suffix(".json").exists():
                    deleted += _unlink(data)
                elif state == "unsupported":
                    deleted += _unlink([p for p in data if now - (_mtime_or_none(p) or now) > _STALE_TMP_S])
        else:
            complete.append((used, size, store))
            total += size
    for _, size, store in sorted(complete, key=lambda entry: entry[0]):  # least recently used first
        if total <= limit_bytes:
            break
        with _entry_lock(store, blocking=False) as state:
            if state != "busy":  # busy: being opened or repaired now; skipped this time
                deleted += _delete_entry(store)
                total -= size
    return deleted


def drop_cache(store: Path) -> None:
    """Unlink the files of the cache ``store``; a memory map still open keeps its data until released."""
    for path in _entry_files(store):
        # Windows refuses to unlink mapped files: pruning removes them later.
        with contextlib.suppress(OSError):
            path.unlink()


def _entry_files(store: Path) -> list[Path]:
    """The published files of an entry, the ``.json`` marker first (the order to delete them in)."""
    return [store.with_suffix(".json"), store, store.with_suffix(".targets.pt")]


def _delete_entry(store: Path) -> list[Path]:
    return _unlink(_entry_files(store))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # deleted by a concurrent run
        return 0


def _mtime_or_none(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:  # missing, or deleted by a concurrent run
        return None


def _unlink(paths: list[Path]) -> list[Path]:
    gone = []
    for path in paths:
        try:
            path.unlink()
            gone.append(path)
        except FileNotFoundError:
            pass
    return gone


@dataclass
class FeatureSet:
    """Cached head inputs ``[N, ...]`` and targets ``[N]``, in dataset order."""

    features: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def batches(
        self, order: list[int] | None, batch_size: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(features, targets)`` batches in ``order`` (dataset order when None), on ``device``."""
        indices = torch.arange(len(self)) if order is None else torch.tensor(order)
        for start in range(0, len(indices), batch_size):
            chosen = indices[start : start + batch_size]
            features = self.features.index_select(0, chosen.to(self.features.device))
            yield (
                features.to(device, non_blocking=True),
                self.targets.index_select(0, chosen.to(self.targets.device)).to(device, non_blocking=True),
            )


def _raise_space_error(exc: OSError, store: Path, needed: int) -> None:
    """Raise ``exc`` as a :class:`CacheSpaceError` that says what to do, when it is a full disk."""
    code = exc.errno
    if code is None or code not in _FULL_DISK:
        return
    raise CacheSpaceError(
        code,
        f"{exc.strerror or os.strerror(code)}: the feature cache {store} needs {needed} bytes "
        f"({_human(needed)}) in {store.parent}. Free that much space there, point cache_dir (or "
        f"$VGGTRANSFER_CACHE) at a disk with room, or keep the features in memory by raising "
        f"$VGGTRANSFER_CACHE_MEMORY_GB",
    ) from exc


def _human(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.2f} MB"


def _reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of disk for the open, empty file ``fd``.

    The file system then has the space for it, or an OSError (ENOSPC) was raised, before any
    time is spent computing what goes into it.
    """
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}:
                raise
    zeros = bytes(min(size, 1 << 20))  # file systems without fallocate: write the zeros
    written = 0
    while written < size:
        count = os.write(fd, zeros[: size - written])
        if count <= 0:  # pragma: no cover - write() reports a full disk as ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written += count
    os.fsync(fd)


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing file) holding ``data``, on disk when this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class _DiskWriter:
    """The features of one cache entry being written: temporaries first, published at the end.

    Rows are written with ``pwrite`` into the reserved file, not through a memory map: a file
    system that still runs out of space (copy-on-write ones can, after a reservation) then
    reports ENOSPC instead of killing the process with SIGBUS.
    """

    def __init__(self, store: Path, shape: tuple[int, ...]) -> None:
        self.store, self.shape = store, shape
        self.size = math.prod(shape) * 4
        self.row_bytes = math.prod(shape[1:]) * 4
        prefix = f"{store.stem}.{os.getpid()}.{secrets.token_hex(4)}"
        self.features = store.with_name(f"{prefix}.tmp")
        self.targets = store.with_name(f"{prefix}.targets.tmp")
        self.description = store.with_name(f"{prefix}.json.tmp")
        self._fd = -1
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.features, os.O_RDWR | os.O_CREAT | os.O_EXCL | _BINARY, 0o666)
            _flock(self._fd)  # in use until this writer publishes, discards or dies
            _reserve(self._fd, self.size)
        except OSError as exc:
            self.discard()
            _raise_space_error(exc, store, self.size)
            raise
        except BaseException:
            self.discard()
            raise

    def write(self, start: int, rows: np.ndarray[Any, Any]) -> None:
        """Write ``rows`` (float32) as the samples from ``start`` on."""
        if rows.shape[1:] != self.shape[1:] or start + len(rows) > self.shape[0]:
            raise ValueError(
                f"cache_features: the head received inputs of shape {tuple(rows.shape)} after "
                f"{start} samples, but {self.shape} were expected from the first batch"
            )
        data = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1).view(np.uint8).data
        offset = start * self.row_bytes
        try:
            while data:
                if hasattr(os, "pwrite"):
                    count = os.pwrite(self._fd, data, offset)
                else:  # pragma: no cover - Windows
                    os.lseek(self._fd, offset, os.SEEK_SET)
                    count = os.write(self._fd, data)
                data, offset = data[count:], offset + count
        except OSError as exc:
            _raise_space_error(exc, self.store, self.size)
            raise

    def publish(self, targets: torch.Tensor) -> FeatureSet:
        """Move the entry into place, unless another writer did first; the entry, opened."""
        try:
            buffer = io.BytesIO()
            torch.save(targets, buffer)
            meta = json.dumps({"shape": list(self.shape), "dtype": "float32"}).encode()
            try:
                os.fsync(self._fd)  # where delayed allocation fails, it fails here
            except OSError as exc:
                _raise_space_error(exc, self.store, self.size)
                raise
            try:
                _write_new(self.targets, buffer.getvalue())
                _write_new(self.description, meta)
            except OSError as exc:
                _raise_space_error(exc, self.store, len(buffer.getvalue()) + len(meta))
                raise
            with _entry_lock(self.store):
                try:
                    existing = _open_checked(self.store)
                except _Damaged as damage:
                    _warn_damaged(self.store, damage)
                    _delete_entry(self.store)
                    existing = None
                if existing is not None:  # the first complete writer won: use its entry
                    return existing
                os.replace(self.features, self.store)
                os.replace(self.targets, self.store.with_suffix(".targets.pt"))
                os.replace(self.description, self.store.with_suffix(".json"))  # complete now
                opened = _open_checked(self.store)
            assert opened is not None  # just published, under the lock
            return opened
        finally:
            self.discard()

    def discard(self) -> None:
        """Delete what is left of the temporaries and release the features file."""
        for path in (self.features, self.targets, self.description):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def compute_features(
    model: nn.Module,
    loader: DataLoader[Any],
    *,
    device: torch.device,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    autocast: Callable[[], Any],
    on_batch: Callable[[int], None],
    store: Path,
    budget_bytes: int,
) -> FeatureSet:
    """Run ``model`` over ``loader`` once, in eval mode, and keep what its head receives.

    Features that fit in ``budget_bytes`` stay in memory (on ``device``); larger ones are written
    to the disk entry ``store`` (see the module docstring). Another process writing the same
    entry at the same time is harmless: the first to finish publishes it, the others use it.

    Raises:
        CacheSpaceError: No room on the disk for the entry; nothing of it is left behind.
    """
    head = locate_head(model, "cache_features").module
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    chunks: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    writer: _DiskWriter | None = None
    written = 0
    total = len(loader.dataset)  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs, labels in loader:
                captured.clear()
                with autocast():
                    model(prepare(inputs))
                features = captured[0].float()
                if not chunks and writer is None and features[0].numel() * 4 * total > budget_bytes:
                    writer = _DiskWriter(store, (total, *features.shape[1:]))
                if writer is None:
                    chunks.append(features)
                else:
                    writer.write(written, features.cpu().numpy())
                    written += len(features)
                targets.append(torch.as_tensor(labels).cpu())
                on_batch(len(labels))
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    finally:
        hook.remove()
        model.train(was_training)
    all_targets = torch.cat(targets).long()
    if writer is None:
        return FeatureSet(torch.cat(chunks), all_targets.to(device))
    return writer.publish(all_targets)


class _Damaged(Exception):
    """A cache entry whose files do not agree with its description; the message says how."""


def open_features(store: Path) -> FeatureSet | None:
    """The cache entry ``store`` written by :func:`compute_features`, memory-mapped; None if absent.

    An entry without its ``.json`` marker (still being written, or left by a killed run) is absent.

    A damaged entry (see the module docstring) is reported with a ``RuntimeWarning``, its files
    are deleted, and None is returned, so that the features are computed again.
    """
    with _entry_lock(store, shared=True):
        try:
            return _open_checked(store)
        except _Damaged:
            pass
    with _entry_lock(store):  # maybe repaired by another process meanwhile: look again, alone
        try:
            return _open_checked(store)
        except _Damaged as damage:
            _warn_damaged(store, damage)
            _delete_entry(store)
            return None


def _warn_damaged(store: Path, damage: _Damaged) -> None:
    warnings.warn(
        f"the feature cache entry {store.with_suffix('')} is damaged: {damage}. Its files are "
        f"deleted and the features computed again",
        RuntimeWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside vggtransfer, for a warning raised by our caller."""
    package = os.path.dirname(__file__)
    frame = sys._getframe(1)  # the function that will call warnings.warn
    level = 1
    while frame.f_back is not None and os.path.dirname(frame.f_code.co_filename) == package:
        frame = frame.f_back
        level += 1
    return level


_MAX_DESCRIPTION = 1 << 16  # a description is some 50 bytes; more is not one of ours


def _open_checked(store: Path) -> FeatureSet | None:
    """The entry ``store``, opened; None without a ``.json``.

    Raises:
        _Damaged: the files are missing, of the wrong size or unreadable.
    """
    description = store.with_suffix(".json")
    targets_file = store.with_suffix(".targets.pt")
    for path in (description, store, targets_file):
        # Opening a FIFO (or a device) for reading would block or never end: regular files only.
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(path.stat().st_mode):
                raise _Damaged(f"{path.name} is not a regular file")
    try:
        with open(description, "rb") as file:
            raw = file.read(_MAX_DESCRIPTION + 1)
    except FileNotFoundError:
        return None
    shape = _described_shape(raw, description.name)
    expected = math.prod(shape) * 4
    try:
        size = store.stat().st_size
    except FileNotFoundError:
        raise _Damaged(f"{store.name} is missing") from None
    if size != expected:
        raise _Damaged(f"{store.name} holds {size} bytes but {description.name} describes {expected}")
    try:
        targets = torch.load(targets_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise _Damaged(f"{targets_file.name} is missing") from None
    except Exception as exc:  # a torn or foreign file: whatever torch.load raises for it
        raise _Damaged(f"{targets_file.name} cannot be read ({type(exc).__name__})") from None
    if not (isinstance(targets, torch.Tensor) and targets.dtype == torch.int64 and targets.dim() == 1):
        raise _Damaged(f"{targets_file.name} does not hold a 1-d int64 tensor")
    if len(targets) != shape[0]:
        raise _Damaged(f"{targets_file.name} holds {len(targets)} targets for {shape[0]} samples")
    # Used now: pruning deletes the least recently used caches first. A read-only cache folder
    # still serves its caches.
    with contextlib.suppress(OSError):
        os.utime(description)
    # Copy-on-write mapping: pages are read as batches touch them, and never written back.
    array = np.memmap(store, dtype=np.float32, mode="c", shape=tuple(shape))
    return FeatureSet(torch.from_numpy(array), targets)


def _described_shape(raw: bytes, name: str) -> list[int]:
    """The shape in the description ``raw`` of a cache entry, checked as untrusted input."""
    if not raw:
        raise _Damaged(f"{name} is empty")
    if len(raw) > _MAX_DESCRIPTION:
        raise _Damaged(f"{name} is larger than {_MAX_DESCRIPTION} bytes")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Damaged(f"{name} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise _Damaged(f"{name} is not a JSON object")
    shape = meta.get("shape")
    if not (
        isinstance(shape, list)
        and shape
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise _Damaged(f"{name} has shape {_short(shape)}, not a list of positive integers")
    if meta.get("dtype") != "float32":
        raise _Damaged(f"{name} has dtype {_short(meta.get('dtype'))}, not 'float32'")
    return shape


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
