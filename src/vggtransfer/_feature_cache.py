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
features afresh. :class:`FeatureCache` holds the policy (when caching is allowed), the sets already
computed, and the report of what it decided; ``_feature_store`` keeps the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ._arguments import check_positive_int
from ._augmented_views import SeededView, view_key
from ._distributed import gather_rows
from ._feature_store import (
    FeatureSet,
    cache_limit_bytes,
    compute_features,
    default_cache_dir,
    drop_cache,
    memory_budget,
    open_features,
    prune_caches,
)
from ._freeze import held_in_eval
from ._heads import locate_head
from ._progress import Progress
from ._rng import preserved_rng
from ._runtime import Runtime
from ._state_dict import fingerprint
from ._transforms import ImageTransform

__all__ = [
    "CacheMode",
    "FeatureCache",
    "TRAINING_ROLES",
    "Verdict",
    "augmentable",
    "backbone_key",
    "cache_key",
    "cacheability",
    "data_key",
]

CacheMode = bool | Literal["auto"]

_MISSING = object()  # a dataset without a transform attribute

# Bumped whenever preprocessing changes pixels for the same settings, so that disk caches written
# by an older vggtransfer are not reused: 2 = PIL images resized as tensors.
_PIXELS_VERSION = 2


@dataclass(frozen=True)
class Verdict:
    """Whether the features of some data through a model are the same every epoch.

    Attributes:
        kind: ``"fixed"``: they are, caching is exact. ``"unknown"``: they may vary (an opaque
            transform); ``cache_features=True`` trusts the user that they do not. ``"varies"``:
            they do, or caching is impossible; never cached.
        reason: Why, in words, for the cache report and errors (None when fixed).
    """

    kind: Literal["fixed", "unknown", "varies"]
    reason: str | None = None


def _training_sensitive(module: nn.Module) -> bool:
    # Modules whose output depends on module.training; torchvision's StochasticDepth too.
    return isinstance(module, (_BatchNorm, _DropoutNd)) or type(module).__name__ == "StochasticDepth"


def _backbone_verdict(model: nn.Module) -> Verdict:
    """Whether the part of ``model`` before its head is a fixed function."""
    head = locate_head(model, "cache_features")
    inside_head = {id(m) for m in head.module.modules()}
    head_params = {id(p) for p in head.module.parameters()}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in head_params:
            return Verdict(
                "varies", f"parameter {name!r} outside the head is trainable (features are not frozen)"
            )
    for name, module in model.named_modules():
        if id(module) in inside_head or module is model:
            continue
        if _training_sensitive(module) and not held_in_eval(module):
            return Verdict(
                "varies",
                f"{name!r} ({type(module).__name__}) outside the head changes between training and "
                f"evaluation (BatchNorm trainable, or dropout not frozen)",
            )
    return _functional_dropout_verdict(model, inside_head)


def _functional_dropout_verdict(model: nn.Module, inside_head: set[int]) -> Verdict:
    """Whether a module applies dropout by function call, from its ``drop_rate`` attribute.

    timm's ResNet and EfficientNet call ``F.dropout(x, drop_rate, self.training)`` before their
    classifier, which no dropout module shows; the cached pass (evaluation mode) would skip it.
    """
    for name, module in model.named_modules():
        rate = getattr(module, "drop_rate", 0.0)
        if id(module) in inside_head or held_in_eval(module) or not isinstance(rate, (int, float)):
            continue
        if rate > 0:
            return Verdict(
                "varies",
                f"{name or 'the model'!r} ({type(module).__name__}) has drop_rate={rate}: timm may apply "
                f"that dropout in training by a function call, which cached features cannot reproduce; "
                f"build the model with drop_rate=0 to cache features",
            )
    return Verdict("fixed")


def _root_dataset(data: Any) -> Any:
    while isinstance(data, Subset):
        data = data.dataset
    return data


def _transform_verdict(data: Any) -> Verdict:
    """Whether the samples of ``data`` are the same tensors every epoch."""
    root = _root_dataset(data)
    if isinstance(root, TensorDataset):
        return Verdict("fixed")
    transform = getattr(root, "transform", _MISSING)
    if transform is _MISSING:
        return Verdict(
            "unknown", f"cannot tell whether {type(root).__name__} returns the same tensors every epoch"
        )
    # vggtransfer's own transform knows whether it is random, and is never trusted against that;
    # any other transform may declare it with a boolean `deterministic` attribute.
    declared = getattr(transform, "deterministic", None)
    if isinstance(declared, bool):
        if declared:
            return Verdict("fixed")
        why = (
            "augments randomly (train=True)"
            if isinstance(transform, ImageTransform)
            else "declares itself random"
        )
        return Verdict(
            "varies",
            f"the transform {why}",
        )
    return Verdict(
        "unknown",
        f"the transform {type(transform).__name__} is not a vggtransfer ImageTransform, so it may "
        f"be random; pass cache_features=True if it is deterministic",
    )


def cacheability(model: nn.Module, data: Any) -> Verdict:
    """Whether features of ``data`` through ``model`` can be cached without changing results."""
    if isinstance(data, DataLoader):
        return Verdict(
            "varies", "a DataLoader was given (its order and batching are its own); pass the Dataset instead"
        )
    backbone = _backbone_verdict(model)
    return backbone if backbone.kind != "fixed" else _transform_verdict(data)


def augmentable(model: nn.Module, data: Any) -> bool:
    """Whether ``cache_views`` applies: a frozen backbone, and a Dataset whose transform may be random."""
    return (
        not isinstance(data, DataLoader)
        and _backbone_verdict(model).kind == "fixed"
        and _transform_verdict(data).kind != "fixed"
    )


#: The roles that train, shuffled: those that ``cache_views`` serves.
TRAINING_ROLES = ("fit(train)", "find_lr")


def _with_hint(verdict: Verdict, what: str, model: nn.Module, data: Any) -> str | None:
    """The verdict's reason, and for training data that views could cache, how to have them."""
    if what in TRAINING_ROLES and augmentable(model, data) and verdict.kind == "varies":
        return f"{verdict.reason}; pass cache_views=K to cache K augmented views of every image"
    return verdict.reason


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
            # fsencode: any name the OS gave, even one that is not UTF-8 (surrogate-escaped);
            # the same bytes as before for the others, so existing caches stay valid.
            digest.update(os.fsencode(path))
            digest.update(f"|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode("utf-8", "surrogatepass"))
    else:
        return None
    transform = getattr(root, "transform", None)
    digest.update(
        json.dumps(transform.to_dict() if isinstance(transform, ImageTransform) else repr(transform)).encode()
    )
    digest.update(json.dumps(indices).encode())
    # What else turns a file into a sample: ImageFolder's label mapping and image reader. Only
    # when set, so that the keys of datasets without them (and their caches) stay as they were.
    for name in ("target_transform", "loader"):
        part = getattr(root, name, None)
        if part is not None:
            digest.update(f"|{name}={_describe(part)}".encode())
    return digest.hexdigest()


def _describe(part: object) -> str:
    """A stable name for a module-level function (the same in every process), else its repr.

    A lambda's or a local function's repr holds its address: unique to this object, so a cache
    keyed by it is never mistaken for another's (nor found again by a later process).
    """
    qualname = getattr(part, "__qualname__", "")
    if callable(part) and qualname and "<" not in qualname and not isinstance(part, type):
        return f"{getattr(part, '__module__', '?')}.{qualname}"
    return repr(part)


def backbone_key(model: nn.Module) -> str:
    """A fingerprint of every state-dict entry outside the head (what the features depend on)."""
    head_name = locate_head(model, "cache_features").name
    state = model.state_dict()
    return fingerprint(state, {k for k in state if not k.startswith(f"{head_name}.")})


def cache_key(model: nn.Module, data: Dataset[Any], precision: str) -> str | None:
    """The key of the features of ``data`` through ``model``; None if the data has no fingerprint."""
    data_part = data_key(data)
    if data_part is None:
        return None
    head_name = locate_head(model, "cache_features").name
    key = f"{backbone_key(model)}|{data_part}|{head_name}|{precision}|{_PIXELS_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _within_budget(stored: FeatureSet, device: torch.device, budget: int) -> FeatureSet:
    """A memory-mapped set moved to ``device`` when it fits the budget, as a computed set would be."""
    # On the CPU the mapping already reads from the page cache; on a GPU, copying once beats
    # moving every batch of every epoch from host memory.
    if device.type == "cpu" or stored.features.numel() * stored.features.element_size() > budget:
        return stored
    return FeatureSet(stored.features.to(device), stored.targets.to(device))


class FeatureCache:
    """Decides whether a data set's features are cached, and computes, keeps and reuses them.

    Args:
        mode: ``"auto"`` caches when the result is provably the same as without caching;
            ``True`` also trusts transforms it cannot inspect; ``False`` never caches.
        folder: Where sets past the memory budget are stored; ``None`` for the default
            (``$VGGTRANSFER_CACHE`` or ``~/.cache/vggtransfer/features``).
        compile_network: Run the feature pass through ``torch.compile`` with inductor freezing.
        views: Cache this many augmented views of training data whose transform is random.
        persist: Also write sets that fit in memory to ``folder``, for later runs to reuse.

    Attributes:
        report: For each role (``"fit(train)"``, ``"fit(val)"``, ``"evaluate"``), ``"on"``,
            ``"on (reused)"``, ``"on (from disk)"`` or ``"off: <reason>"``.
    """

    def __init__(
        self,
        mode: CacheMode,
        folder: Path | None,
        compile_network: bool,
        views: int | None = None,
        persist: bool = False,
    ) -> None:
        if mode not in ("auto", True, False) or not isinstance(mode, (bool, str)):
            raise ValueError(f"Trainer: expected cache_features to be 'auto', True or False but got {mode!r}")
        if not isinstance(persist, bool):
            raise TypeError(f"Trainer: expected persist_cache to be True or False but got {persist!r}")
        if views is not None:
            views = check_positive_int(views, "cache_views", "Trainer", limit=1000)
            if mode is False:
                raise ValueError(
                    f"Trainer: cache_views={views} caches augmented views of the features, but "
                    f"cache_features=False turns caching off; drop one of the two"
                )
        self.mode = mode
        self.views = views
        self.persist = persist
        self.folder = folder
        self.compile_network = compile_network
        self.report: dict[str, str] = {}
        #: The feature sets computed or opened so far, by cache key.
        self.sets: dict[str, FeatureSet] = {}
        self._compiled: tuple[str, nn.Module] | None = None  # (backbone fingerprint, compiled network)

    def features(
        self,
        model: nn.Module,
        data: Dataset[Any] | DataLoader[Any],
        *,
        what: str,
        runtime: Runtime,
        loader: Callable[[Dataset[Any]], DataLoader[Any]],
        progress: Progress,
        compute: bool = True,
        seed: int = 0,
        views: int | None = None,
        refuse: str | None = None,
    ) -> list[FeatureSet] | None:
        """The cached head inputs of ``data``, computed now if needed and allowed; None when off.

        Args:
            model: The unwrapped network.
            data: What the user passed.
            what: The role, for the report and errors.
            runtime: Device, precision and processes of the pass.
            loader: Makes an unshuffled loader over this process's share of a dataset.
            progress: Shows the feature pass.
            compute: Whether a missing cache may be computed (``evaluate`` only reuses).
            seed: The run's seed, from which augmented views draw their randomness.
            views: Cache this many augmented views when the transform is random (training only).
            refuse: Why the caller cannot use cached features at all (``evaluate(tta=True)``
                needs the images): reported, and nothing is computed or reused.

        Returns:
            One feature set, or one per augmented view; None when caching is off.

        Raises:
            ValueError: ``cache_features=True`` for data or a model whose features vary.
        """
        if self.mode is False:
            self.report[what] = "off: cache_features=False"
            return None
        if refuse is not None:
            self.report[what] = f"off: {refuse}"
            return None
        verdict = cacheability(model, data)
        if views is not None and verdict.kind != "fixed" and augmentable(model, data):
            return self._views(model, data, views, seed, what, runtime, loader, progress)  # type: ignore[arg-type]
        if verdict.kind == "varies" and self.mode is True:
            if isinstance(data, DataLoader):
                raise ValueError(
                    f"{what}: cache_features=True needs a Dataset, but a DataLoader was given; "
                    f"pass its dataset and batch_size instead"
                )
            raise ValueError(
                f"{what}: cache_features=True, but {_with_hint(verdict, what, model, data)}; caching "
                f"would change the results"
            )
        if verdict.kind != "fixed" and self.mode == "auto":
            self.report[what] = f"off: {_with_hint(verdict, what, model, data)}"
            return None
        assert not isinstance(data, DataLoader)  # a DataLoader always "varies"
        stored, how = self._one_set(
            model,
            data,
            cache_key(model, data, runtime.precision.name),
            what,
            runtime,
            loader,
            progress,
            compute,
        )
        if stored is None:
            self.report[what] = "off: features not cached by fit"
            return None
        self.report[what] = {"computed": "on", "reused": "on (reused)", "from disk": "on (from disk)"}[how]
        if views is not None:
            self.report[what] += f"; cache_views={views} unused, the transform is deterministic"
        return [stored]

    def _views(
        self,
        model: nn.Module,
        data: Dataset[Any],
        views: int,
        seed: int,
        what: str,
        runtime: Runtime,
        loader: Callable[[Dataset[Any]], DataLoader[Any]],
        progress: Progress,
    ) -> list[FeatureSet]:
        """``views`` feature passes over ``data``, each through its own seeded augmentation."""
        base = cache_key(model, data, runtime.precision.name)
        sets, hows = [], set()
        # The views' per-sample seeding moves the global generators of the main process (with
        # num_workers=0); the run's own random stream must not depend on whether views were cached.
        with preserved_rng():
            for view in range(views):
                key = None if base is None else view_key(base, seed, views, view)
                stored, how = self._one_set(
                    model, SeededView(data, seed, view), key, f"{what} (view {view + 1} of {views})",
                    runtime, loader, progress, compute=True, share=views,
                )  # fmt: skip
                assert stored is not None  # compute=True always gives a set
                sets.append(stored)
                hows.add(how)
        if any(not torch.equal(s.targets.cpu(), sets[0].targets.cpu()) for s in sets[1:]):
            raise ValueError(
                f"{what}: the labels differ between augmented views of the same data; the dataset "
                f"must return the same label for a sample every time it is read"
            )
        reuse = f", {hows.pop()}" if len(hows) == 1 and "computed" not in hows else ""
        self.report[what] = f"on ({views} augmented views{reuse})"
        return sets

    def _one_set(
        self,
        model: nn.Module,
        data: Dataset[Any],
        key: str | None,
        what: str,
        runtime: Runtime,
        loader: Callable[[Dataset[Any]], DataLoader[Any]],
        progress: Progress,
        compute: bool,
        share: int = 1,
    ) -> tuple[FeatureSet | None, str]:
        """The set stored under ``key``: from memory, from disk, or computed (when ``compute``).

        A computed set may take ``1 / share`` of the memory budget (K views share it).
        """
        if key is not None and key in self.sets:
            return self.sets[key], "reused"
        folder = self.folder or default_cache_dir()
        stored = open_features(folder / f"{key}.bin") if key is not None else None
        how = "from disk" if stored is not None else "computed"
        if stored is None and not compute:
            return None, how
        if stored is None:
            stored = self._compute(model, data, key, folder, what, runtime, loader(data), progress, share)
        else:
            stored = _within_budget(stored, runtime.device, memory_budget(runtime.device) // share)
        if key is not None:
            self.sets[key] = stored
        return stored, how

    def _compute(
        self,
        model: nn.Module,
        data: Dataset[Any],
        key: str | None,
        folder: Path,
        what: str,
        runtime: Runtime,
        loader: DataLoader[Any],
        progress: Progress,
        share: int = 1,
    ) -> FeatureSet:
        """One pass of the frozen network over ``data``; to disk past its share of the memory budget."""
        limit = cache_limit_bytes()  # a malformed setting fails here, not after the feature pass
        # Distributed shards are gathered in memory; the disk cache is single-process.
        budget = memory_budget(runtime.device) // share if runtime.world_size == 1 else 1 << 62
        # persist: on disk whatever the size, when a later run can find it (it has a key).
        persist = self.persist and key is not None and runtime.world_size == 1
        started = time.perf_counter()
        progress.start_epoch(0, 0, len(loader), f"caching features for {what}")
        store = folder / f"{key or secrets.token_hex(16)}.bin"
        stored = compute_features(
            self._network(model),
            loader,
            device=runtime.device,
            prepare=runtime.to_device,
            autocast=runtime.autocast,
            on_batch=lambda count: progress.step(None, count),
            store=store,
            budget_bytes=0 if persist else budget,
        )
        if persist:
            stored = _within_budget(stored, runtime.device, budget)
        if store.exists():  # went to disk
            if key is None:  # no later run can find it: drop the names now, the mapping stays
                drop_cache(store)
            prune_caches(folder, keep=store, limit_bytes=limit)
        if runtime.world_size > 1:
            # Each process computed every world_size-th sample; now all of them hold all.
            total = len(data)  # type: ignore[arg-type]
            stored = FeatureSet(gather_rows(stored.features, total), gather_rows(stored.targets, total))
        progress.message(
            f"feature caching: {len(stored)} samples of {what} through the frozen backbone once "
            f"({time.perf_counter() - started:.1f}s); the head {'trains' if what == 'fit(train)' else 'runs'} on them"
        )
        return stored

    def _network(self, model: nn.Module) -> nn.Module:
        """The network for the feature pass: compiled when asked, for these weights."""
        if not self.compile_network:
            return model
        key = backbone_key(model)
        if self._compiled is None or self._compiled[0] != key:
            # Inductor freezing turns the weights into constants, so a graph compiled for other
            # weights would silently compute stale features: recompile when they change.
            compiled: nn.Module = torch.compile(model, options={"freezing": True})  # type: ignore[assignment]
            self._compiled = (key, compiled)
        return self._compiled[1]
