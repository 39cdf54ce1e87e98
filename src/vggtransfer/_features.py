"""Feature caching: compute a frozen backbone's output once, then train the head on it.

With frozen features, 99% of VGG16's work per image is a feature pass whose result never changes,
yet a plain training loop recomputes it every epoch. When that result is provably the same every
epoch (the backbone is frozen and in evaluation mode, and the images are preprocessed
deterministically), the Trainer computes it once and trains the head on the stored tensors.

What is stored is the *input of the classifier head*, captured with a forward hook, so the cut
point works for every family: VGG's flattened 25088-wide feature map, ResNet's pooled 512 values,
or, for a model made by ``append_classifier``, the whole frozen network's 1000 logits.

Caches are keyed by a fingerprint of the frozen weights, the transform settings and the data
(file paths, sizes and modification times, or tensor bytes), so changing any of them computes the
features afresh. Small caches live in memory; past a memory budget they are written to a
memory-mapped file in a cache folder and reused by later runs with the same key. The folder is
kept under a size limit by deleting the least recently used caches.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ._checkpoint import fingerprint
from ._freeze import _HOOK_ATTR
from ._heads import _locate
from ._transforms import ImageTransform

__all__ = [
    "FeatureSet",
    "cache_limit_bytes",
    "cacheability",
    "compute_features",
    "data_key",
    "default_cache_dir",
    "drop_cache",
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


# The files of one cache entry, beside ``KEY.bin``; ``.json`` is written last and marks it complete.
_ENTRY_SUFFIXES = (".bin", ".json", ".targets.pt", ".tmp")
# Bumped whenever preprocessing changes pixels for the same settings, so that disk caches written
# by an older vggtransfer are not reused: 2 = PIL images resized as tensors.
_PIXELS_VERSION = 2
_KEY_NAME = re.compile(r"[0-9a-f]{32}")  # cache_key() and one-off names: 32 hex digits
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
        if _KEY_NAME.fullmatch(stem) and path.is_file() and path.name.endswith(_ENTRY_SUFFIXES):
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


def _training_sensitive(module: nn.Module) -> bool:
    # Modules whose output depends on module.training; torchvision's StochasticDepth too.
    return isinstance(module, (_BatchNorm, _DropoutNd)) or type(module).__name__ == "StochasticDepth"


def backbone_reason(model: nn.Module) -> str | None:
    """Why the part of ``model`` before its head is not a fixed function (None when it is)."""
    head = _locate(model, "cache_features")
    inside_head = {id(m) for m in head.module.modules()}
    head_params = {id(p) for p in head.module.parameters()}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in head_params:
            return f"parameter {name!r} outside the head is trainable (features are not frozen)"
    for name, module in model.named_modules():
        if id(module) in inside_head or module is model:
            continue
        if _training_sensitive(module) and _HOOK_ATTR not in module.__dict__:
            return (
                f"{name!r} ({type(module).__name__}) outside the head changes between training and "
                f"evaluation (BatchNorm trainable, or dropout not frozen)"
            )
    return None


def _root_dataset(data: Any) -> Any:
    while isinstance(data, Subset):
        data = data.dataset
    return data


def transform_reason(data: Any) -> str | None:
    """Why the samples of ``data`` may differ between epochs (None when they cannot)."""
    root = _root_dataset(data)
    if isinstance(root, TensorDataset):
        return None
    transform = getattr(root, "transform", "missing")
    if transform == "missing":
        return f"cannot tell whether {type(root).__name__} returns the same tensors every epoch"
    if isinstance(transform, ImageTransform):
        return None if transform.deterministic else "the transform augments randomly (train=True)"
    return (
        f"the transform {type(transform).__name__} is not a vggtransfer ImageTransform, so it may "
        f"be random; pass cache_features=True if it is deterministic"
    )


def cacheability(model: nn.Module, data: Any) -> str | None:
    """Why features of ``data`` through ``model`` cannot be cached, or None when they can."""
    if isinstance(data, DataLoader):
        return "a DataLoader was given (its order and batching are its own); pass the Dataset instead"
    return backbone_reason(model) or transform_reason(data)


def data_key(data: Any) -> str | None:
    """A fingerprint of the samples of ``data``, or None when it cannot be computed."""
    digest = hashlib.sha256()
    root, indices = data, None
    while isinstance(root, Subset):
        indices = [root.indices[i] for i in indices] if indices is not None else list(root.indices)
        root = root.dataset
    if isinstance(root, TensorDataset):
        tensors = {str(i): tensor for i, tensor in enumerate(root.tensors)}
        digest.update(fingerprint(tensors, set(tensors)).encode())
    elif isinstance(getattr(root, "samples", None), list):
        for path, label in root.samples:
            stat = Path(path).stat()
            digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    else:
        return None
    transform = getattr(root, "transform", None)
    digest.update(
        json.dumps(transform.to_dict() if isinstance(transform, ImageTransform) else repr(transform)).encode()
    )
    digest.update(json.dumps(indices).encode())
    return digest.hexdigest()


def backbone_key(model: nn.Module) -> str:
    """A fingerprint of every state-dict entry outside the head (what the features depend on)."""
    head_name = _locate(model, "cache_features").name
    state = model.state_dict()
    return fingerprint(state, {k for k in state if not k.startswith(f"{head_name}.")})


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
    head = _locate(model, "cache_features").module
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


def cache_key(model: nn.Module, data: Dataset[Any], precision: str) -> str | None:
    """The key of the features of ``data`` through ``model``; None if the data has no fingerprint."""
    data_part = data_key(data)
    if data_part is None:
        return None
    head_name = _locate(model, "cache_features").name
    key = f"{backbone_key(model)}|{data_part}|{head_name}|{precision}|{_PIXELS_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]
