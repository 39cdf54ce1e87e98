"""Where batches come from: a DataLoader over images, or cached features.

:func:`batch_source` is the one entry point: it checks what the user passed, asks the
:class:`FeatureCache` for cached features, and returns a source of batches from the cache if
there are any, or from a loader over the images if not. The Trainer never needs to know which.

Both sources shuffle with :class:`EpochShuffle`, whose order depends only on the run's seed and
the epoch, so training on cached features visits the samples in exactly the order that training
on the images would, and a resumed run visits them as the uninterrupted run did.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ._arguments import check_positive_int, check_workers
from ._augmented_views import view_batches, view_choice
from ._batch import check_known_labels, check_targets, collate_checked
from ._feature_cache import FeatureCache
from ._feature_store import FeatureSet
from ._heads import known_output_count, locate_head
from ._progress import Progress
from ._rng import preserved_rng
from ._runtime import Runtime, unwrap
from ._tta import TTA_CACHE_OFF, with_tta

__all__ = [
    "BatchSource",
    "CachedSource",
    "Data",
    "EpochShuffle",
    "LoaderSource",
    "batch_source",
    "check_cached_label",
    "check_data",
    "class_names_of",
    "default_workers",
    "make_loader",
    "shard",
]

#: What ``fit`` and ``evaluate`` accept: a map-style Dataset of (image, label), or a DataLoader.
Data = Dataset[Any] | DataLoader[Any]


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(size)`` drawn from ``seed + epoch``: same epoch, same order.

    Under ``torchrun`` each of the ``world`` processes takes every ``world``-th position of the
    same permutation (padded with its first items to a multiple of ``world``, so that all
    processes run the same number of steps). Step k of the processes together then covers the
    same samples as step k of one process with a ``world`` times larger batch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world, self.epoch = size, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        if self.world > 1:
            padding = (-self.size) % self.world
            order = torch.cat([order, order[:padding]])[self.rank :: self.world]
        return iter(order.tolist())

    def __len__(self) -> int:
        return -(-self.size // self.world)


def shard(size: int, rank: int, world: int) -> list[int]:
    """The share of ``range(size)`` that process ``rank`` evaluates: every ``world``-th item, unpadded."""
    return list(range(rank, size, world))


def default_workers(environ: Mapping[str, str] | None = None) -> int:
    """Loader processes: one per usable core but one (the main process feeds the model), up to 32.

    Usable cores are those this process may run on (a container's or ``taskset``'s limit, not the
    machine's count), shared among the processes torchrun started on this machine
    (``LOCAL_WORLD_SIZE``). Decoding JPEGs is what limits a frozen VGG's feature pass on a GPU
    (about 240 images/s per core with Pillow against thousands on the GPU), so every core counts.
    """
    environ = os.environ if environ is None else environ
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local_processes = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    return min(32, max(0, cores // local_processes - 1))


def make_loader(
    data: Dataset[Any],
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int | None,
    seed: int,
    pin_memory: bool,
    rank: int = 0,
    world: int = 1,
    what: str = "fit(train)",
    class_labels: bool = True,
) -> DataLoader[Any]:
    """A DataLoader that shuffles with :class:`EpochShuffle` and seeds workers per epoch.

    Under ``torchrun`` (``world > 1``) it reads only process ``rank``'s share of ``data``.
    Batches of images of mixed sizes fail with a :class:`BatchError` naming ``what``.
    """
    workers = default_workers() if num_workers is None else num_workers
    size = len(data)  # type: ignore[arg-type]
    sampler: Any = (
        EpochShuffle(size, seed, rank, world)
        if shuffle
        else (shard(size, rank, world) if world > 1 else None)
    )
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=functools.partial(collate_checked, what=what, class_labels=class_labels),
        # Worker seeds are drawn from this generator, reseeded every epoch.
        generator=torch.Generator().manual_seed(seed),
        # Workers that outlive an epoch would carry their random state into the next one and
        # break exact resume; starting them is cheap next to an epoch of image decoding.
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


@dataclass
class LoaderSource:
    """Batches of images from a DataLoader, fed through the whole model."""

    loader: DataLoader[Any]
    forward: Callable[[torch.Tensor], torch.Tensor]
    seed: int
    check_labels: Callable[[torch.Tensor], None] | None = None  # run on each batch's labels

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch``, in that epoch's order, their labels checked on the CPU."""
        if isinstance(self.loader.sampler, EpochShuffle):
            self.loader.sampler.set_epoch(epoch)
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(self.seed + epoch)
        for inputs, targets in self.loader:
            if self.check_labels is not None:
                self.check_labels(targets)
            yield inputs, targets

    @property
    def steps(self) -> int | None:
        """Batches per epoch, when known."""
        try:
            return len(self.loader)
        except TypeError:
            return None


@dataclass
class CachedSource:
    """Batches of cached head inputs, fed through the head alone.

    With several augmented views (``Trainer(cache_views=K)``), each sample's row comes from the
    view :func:`view_choice` picks for it in that epoch.
    """

    views: list[FeatureSet]
    forward: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int
    shuffle: bool
    seed: int
    device: torch.device
    rank: int = 0
    world: int = 1

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch``, in the order :class:`EpochShuffle` gives the images."""
        size = len(self.views[0])
        if self.shuffle:
            sampler = EpochShuffle(size, self.seed, self.rank, self.world)
            sampler.set_epoch(epoch)
            order: list[int] | None = list(sampler)
        else:
            order = shard(size, self.rank, self.world) if self.world > 1 else None
        if len(self.views) == 1:
            return self.views[0].batches(order, self.batch_size, self.device)
        choice = view_choice(self.seed, epoch, size, len(self.views))
        return view_batches(self.views, choice, order, self.batch_size, self.device)

    @property
    def steps(self) -> int:
        """Batches per epoch (of this process)."""
        per_process = math.ceil(len(self.views[0]) / self.world)
        return math.ceil(per_process / self.batch_size)


BatchSource = LoaderSource | CachedSource


def check_data(data: object, what: str, world_size: int, *, class_labels: bool = True) -> Any:
    """Refuse what cannot be trained or evaluated on, before any work starts.

    A Dataset must have a length, at least one sample, and a first sample that is an
    ``(image tensor, int label)`` pair. Under torchrun a DataLoader is refused: each process
    must be given its own share of the Dataset.

    Returns:
        The label of the first sample; None for a DataLoader.

    Raises:
        TypeError: not a Dataset or DataLoader, or a first sample of the wrong kind.
        ValueError: an empty Dataset, or a DataLoader under torchrun.
    """
    if isinstance(data, DataLoader):
        if world_size > 1:
            raise ValueError(
                f"{what}: under torchrun, pass a Dataset rather than a DataLoader, so that each of "
                f"the {world_size} processes can be given its own share of it"
            )
        return None
    if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        raise TypeError(
            f"{what}: expected a torch Dataset (with __len__) or a DataLoader but got {type(data).__name__}"
        )
    if len(data) == 0:
        raise ValueError(f"{what}: the dataset is empty; expected at least one (image, label) sample")
    with preserved_rng():  # reading a sample through a random transform draws random numbers
        first = data[0]
    _check_sample(first, what, class_labels)
    return first[1]


def _check_sample(sample: Any, what: str, class_labels: bool) -> None:
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        raise TypeError(
            f"{what}: expected each sample to be an (image, label) pair but the first one is a "
            f"{type(sample).__name__}"
        )
    image, label = sample
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"{what}: expected the image of each sample to be a tensor but the first one is a "
            f"{type(image).__name__}; give the dataset a transform, e.g. "
            f"ImageFolder(root, transform=vt.imagenet_transform())"
        )
    if not class_labels:  # another loss: any tensor or number, as that loss needs
        if isinstance(label, bool) or not isinstance(label, (numbers.Number, torch.Tensor)):
            raise TypeError(
                f"{what}: expected the label of each sample to be a number or a tensor but the first one "
                f"is a {type(label).__name__}"
            )
        return
    integer_tensor = (
        isinstance(label, torch.Tensor)
        and label.ndim == 0
        and not (label.dtype == torch.bool or label.is_floating_point() or label.is_complex())
    )
    if not (isinstance(label, numbers.Integral) or integer_tensor) or isinstance(label, bool):
        found = f"{label.dtype} tensor" if isinstance(label, torch.Tensor) else type(label).__name__
        raise TypeError(
            f"{what}: expected the label of each sample to be an int class index but the first one "
            f"is a {found} ({label!r}); labels are not rounded or converted"
        )


def batch_source(
    data: Data,
    *,
    model: nn.Module,
    what: str,
    batch_size: int,
    shuffle: bool,
    num_workers: int | None,
    seed: int,
    runtime: Runtime,
    cache: FeatureCache,
    progress: Progress,
    compute_cache: bool = True,
    class_labels: bool = True,
    tta: bool = False,
) -> BatchSource:
    """The batches of ``data`` for one role: from cached features when that gives the same result.

    Args:
        data: What the user passed.
        model: The model as the Trainer holds it (possibly compiled by the user).
        what: The role (``"fit(train)"``, ``"fit(val)"``, ``"evaluate"``), for errors and the
            cache report.
        batch_size: Samples per step.
        shuffle: Shuffle per epoch (training) or keep dataset order (evaluation).
        num_workers: Loader processes; None for :func:`default_workers`.
        seed: The run's seed, for the shuffling order.
        runtime: Device and processes.
        cache: Decides whether features are cached, and holds them.
        progress: Shows a feature pass.
        compute_cache: Whether a missing cache may be computed now.
        class_labels: Labels are class indices (the loss is cross-entropy): check that they
            are integers in ``[0, outputs)``. Other losses get their labels unchecked.
        tta: Feed each batch and its horizontal flip through the model and return the log of
            the mean softmax (see ``_tta``); always from the images, never cached features.

    Raises:
        TypeError, ValueError: see :func:`check_data`; ``cache_features=True`` for data whose
            features vary.
    """
    caller = what.split("(")[0]
    batch_size = check_positive_int(batch_size, "batch_size", caller)
    num_workers = check_workers(num_workers, caller)
    first_label = check_data(data, what, runtime.world_size, class_labels=class_labels)
    network = unwrap(model)
    # Class indices (for cross-entropy) are checked up front where known, then batch by batch.
    check_labels = (
        functools.partial(check_targets, outputs=known_output_count(network), what=what)
        if class_labels
        else None
    )
    if check_labels is not None:
        check_known_labels(data, check_labels)

    loader = functools.partial(
        make_loader, batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=runtime.pin_memory,
        rank=runtime.rank, world=runtime.world_size, what=what, class_labels=class_labels,
    )  # fmt: skip
    features = cache.features(
        network,
        data,
        what=what,
        runtime=runtime,
        loader=functools.partial(loader, shuffle=False),
        progress=progress,
        compute=compute_cache,
        seed=seed,
        views=cache.views if shuffle else None,  # augmented views are for training alone
        refuse=TTA_CACHE_OFF if tta else None,
    )
    if features is not None:
        if check_labels is not None:
            check_labels(features[0].targets)  # all of them, once (every view has the same)
            check_cached_label(features[0], first_label, what)
        head = runtime.wrap(locate_head(network, "Trainer").module, training=shuffle)
        return CachedSource(
            features, head, batch_size, shuffle, seed, runtime.device, runtime.rank, runtime.world_size
        )
    images = data if isinstance(data, DataLoader) else loader(data, shuffle=shuffle)
    return LoaderSource(images, with_tta(runtime.wrap(model, training=shuffle), tta), seed, check_labels)


def check_cached_label(features: FeatureSet, label: Any, what: str) -> None:
    """The cached targets start with the dataset's first label: a cache of other labels is refused.

    The cache key covers the files, the transforms and the label mapping it can see; this catches
    what it cannot (a dataset whose labels changed by other means).
    """
    if int(features.targets[0]) != int(label):
        raise ValueError(
            f"{what}: the cached features were stored with label {int(features.targets[0])} for the first "
            f"sample, but the dataset now gives {int(label)}; the labels changed without the cache key "
            f"noticing. Delete the feature cache folder (cache_dir) or pass cache_features=False"
        )


def class_names_of(data: Data, current: list[str] | None, outputs: int | None) -> list[str] | None:
    """The class names to use: ``current``, else the ``classes`` of ``data`` (as ImageFolder has).

    Raises:
        ValueError: ``data`` names other classes than ``current``, or not one per model output
            (``outputs``); labels would be misnamed, and the checkpoint could not be loaded.
    """
    dataset: Any = data.dataset if isinstance(data, DataLoader) else data
    while isinstance(dataset, Subset):  # a split of a dataset keeps its classes
        dataset = dataset.dataset
    found = getattr(dataset, "classes", None)
    if not isinstance(found, (list, tuple)) or not all(isinstance(c, str) for c in found):
        return current
    if outputs is not None and len(found) != outputs:
        raise ValueError(
            f"fit: the training data has {len(found)} classes {list(found)} but the model has {outputs} "
            f"outputs; build the head for them with vt.replace_classifier(model, {len(found)})"
            + (" (a single class cannot be learnt: add data of another class)" if len(found) == 1 else "")
        )
    if current is not None and list(found) != current:
        raise ValueError(
            f"fit: the training data's classes {list(found)} differ from the Trainer's "
            f"class_names {current}; labels would be misnamed. Pass matching class_names"
        )
    return [str(name) for name in found]  # np.str_ and other str subclasses become plain str
