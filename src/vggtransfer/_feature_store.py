"""Where cached features live: in memory, or in memory-mapped files in a cache folder.

A :class:`FeatureSet` holds the inputs of a classifier head for every sample of a dataset, in
dataset order. :func:`compute_features` fills one in a single pass of the frozen network; sets
larger than the memory budget go to a ``KEY.bin`` file (with ``KEY.targets.pt`` and a ``KEY.json``
description written last, so a half-written entry is never used), which later runs with the same
key reopen with :func:`open_features`. The folder is kept under ``$VGGTRANSFER_CACHE_LIMIT_GB``
by :func:`prune_caches`, least recently used first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ._heads import locate_head

__all__ = [
    "KEY_NAME",
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
    return Path(os.environ.get("VGGTRANSFER_CACHE", Path.home() / ".cache" / "vggtransfer")) / "features"


def cache_limit_bytes() -> int:
    """Disk space the feature caches of one folder may take: ``$VGGTRANSFER_CACHE_LIMIT_GB``, else 50 GB."""
    raw = os.environ.get("VGGTRANSFER_CACHE_LIMIT_GB", "50")
    try:
        gigabytes = float(raw)
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
        if not gigabytes >= 0:  # also refuses NaN
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


# The files of one cache entry, beside ``KEY.bin``; ``.json`` is written last and marks it complete.
_ENTRY_SUFFIXES = (".bin", ".json", ".targets.pt", ".tmp")
KEY_NAME = re.compile(r"[0-9a-f]{32}")  # cache_key() and one-off names: 32 hex digits
_STALE_TMP_S = 24 * 3600  # a .tmp this old is from a run that was killed, not one still writing


def prune_caches(folder: Path, *, keep: Path, limit_bytes: int) -> list[Path]:
    """Delete the least recently used feature caches in ``folder`` until they fit ``limit_bytes``.

    Use is the modification time of an entry's ``.json`` (:func:`open_features` touches it).
    ``keep`` (the cache just written) is never deleted, nor is a ``.tmp`` file younger than a
    day, which another run may be writing now. A run that still has a deleted cache mapped keeps
    reading it (POSIX unlinks the name, not the open file). Returns the deleted files.
    """
    entries: dict[str, list[Path]] = {}
    for path in folder.glob("*"):
        stem = path.name.split(".", 1)[0]
        # Only files named like a cache key: a shared cache_dir may hold other files.
        if KEY_NAME.fullmatch(stem) and path.is_file() and path.name.endswith(_ENTRY_SUFFIXES):
            entries.setdefault(stem, []).append(path)
    deleted: list[Path] = []
    now = time.time()
    keep_stem = keep.name.split(".", 1)[0]
    total = 0
    complete = []
    for stem, files in entries.items():
        size = sum(_size(path) for path in files)
        used = _mtime_or_none(folder / f"{stem}.json")
        if stem == keep_stem:
            total += size
        elif used is None:  # no .json: being written now, or left by a killed run
            deleted += _unlink([p for p in files if now - (_mtime_or_none(p) or now) > _STALE_TMP_S])
        else:
            complete.append((used, size, files))
            total += size
    for _, size, files in sorted(complete, key=lambda entry: entry[0]):  # least recently used first
        if total <= limit_bytes:
            break
        deleted += _unlink(files)
        total -= size
    return deleted


def drop_cache(store: Path) -> None:
    """Unlink the files of the cache ``store``; a memory map still open keeps its data until released."""
    for path in (store, store.with_suffix(".json"), store.with_suffix(".targets.pt")):
        # Windows refuses to unlink mapped files: pruning removes them later.
        with contextlib.suppress(OSError):
            path.unlink()


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
    to ``store`` as a memory-mapped file, with a ``.json`` description written last so that a
    half-written cache is never used.
    """
    head = locate_head(model, "cache_features").module
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    chunks: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    memmap: Any = None
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
                if not chunks and memmap is None and features[0].numel() * 4 * total > budget_bytes:
                    store.parent.mkdir(parents=True, exist_ok=True)
                    shape = (total, *features.shape[1:])
                    memmap = np.memmap(store.with_suffix(".tmp"), dtype=np.float32, mode="w+", shape=shape)
                if memmap is None:
                    chunks.append(features)
                else:
                    memmap[written : written + len(features)] = features.cpu().numpy()
                    written += len(features)
                targets.append(torch.as_tensor(labels).cpu())
                on_batch(len(labels))
    finally:
        hook.remove()
        model.train(was_training)
    all_targets = torch.cat(targets).long()
    if memmap is None:
        return FeatureSet(torch.cat(chunks), all_targets.to(device))
    memmap.flush()
    os.replace(store.with_suffix(".tmp"), store)
    torch.save(all_targets, store.with_suffix(".targets.pt"))
    store.with_suffix(".json").write_text(json.dumps({"shape": list(memmap.shape), "dtype": "float32"}))
    opened = open_features(store)
    assert opened is not None  # just written, all three files
    return opened


def open_features(store: Path) -> FeatureSet | None:
    """A feature file written by :func:`compute_features`, memory-mapped; None if incomplete."""
    description = store.with_suffix(".json")
    if not (description.is_file() and store.is_file() and store.with_suffix(".targets.pt").is_file()):
        return None
    meta = json.loads(description.read_text())
    # Used now: pruning deletes the least recently used caches first. A read-only cache folder
    # still serves its caches.
    with contextlib.suppress(OSError):
        os.utime(description)
    # Copy-on-write mapping: pages are read as batches touch them, and never written back.
    array = np.memmap(store, dtype=np.float32, mode="c", shape=tuple(meta["shape"]))
    targets = torch.load(store.with_suffix(".targets.pt"), weights_only=True)
    return FeatureSet(torch.from_numpy(array), targets)
