"""Where training batches come from: a DataLoader over images, or cached features.

Both sources shuffle with :class:`EpochShuffle`, whose order depends only on the run's seed and
the epoch, so training on cached features visits the samples in exactly the order that training
on the images would, and a resumed run visits them as the uninterrupted run did.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ._features import FeatureSet

__all__ = ["CachedSource", "EpochShuffle", "LoaderSource", "default_workers", "make_loader", "shard"]


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
) -> DataLoader[Any]:
    """A DataLoader that shuffles with :class:`EpochShuffle` and seeds workers per epoch.

    Under ``torchrun`` (``world > 1``) it reads only process ``rank``'s share of ``data``.
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
    cached: bool = False

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch``, in that epoch's order."""
        if isinstance(self.loader.sampler, EpochShuffle):
            self.loader.sampler.set_epoch(epoch)
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(self.seed + epoch)
        return self.loader

    @property
    def steps(self) -> int | None:
        """Batches per epoch, when known."""
        try:
            return len(self.loader)
        except TypeError:
            return None


@dataclass
class CachedSource:
    """Batches of cached head inputs, fed through the head alone."""

    features: FeatureSet
    forward: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int
    shuffle: bool
    seed: int
    device: torch.device
    rank: int = 0
    world: int = 1
    cached: bool = True

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch``, in the order :class:`EpochShuffle` gives the images."""
        if self.shuffle:
            sampler = EpochShuffle(len(self.features), self.seed, self.rank, self.world)
            sampler.set_epoch(epoch)
            order: list[int] | None = list(sampler)
        else:
            order = shard(len(self.features), self.rank, self.world) if self.world > 1 else None
        return self.features.batches(order, self.batch_size, self.device)

    @property
    def steps(self) -> int:
        """Batches per epoch (of this process)."""
        per_process = math.ceil(len(self.features) / self.world)
        return math.ceil(per_process / self.batch_size)
