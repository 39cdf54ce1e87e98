"""Cached augmented views: feature caching for a random training transform.

Caching frozen features needs the same tensors every epoch, which random augmentation does not
give, so by default a random transform turns caching off and every epoch pays the full feature
pass. ``Trainer(cache_views=K)`` takes the middle way: once, up front, it runs K feature passes,
each over its own augmented view of every training image, and each epoch then trains the head on
one of the K views per image. Augmentation keeps most of its regularising effect (each image is
seen in K variants rather than a new one every epoch) at the cost of K feature passes instead of
one per epoch.

Everything random is derived from the run's seed, so runs are reproducible and resume exactly:

- the randomness of view ``v`` of image ``i`` is drawn from ``(seed, v, i)`` alone, whatever the
  loader's workers, batch size or processes (:class:`SeededView`);
- the view an image gets in epoch ``e`` is drawn from ``(seed, e)`` (:func:`view_choice`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._feature_store import FeatureSet

__all__ = ["SeededView", "sample_seed", "view_batches", "view_choice", "view_key"]


def _mix(*parts: object) -> int:
    """A 63-bit seed from ``parts``: a hash, so that nearby inputs give unrelated seeds."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_seed(seed: int, view: int, index: int) -> int:
    """The seed of the augmentation of sample ``index`` in view ``view`` of a run seeded ``seed``."""
    return _mix("view", seed, view, index)


def view_key(base: str, seed: int, views: int, view: int) -> str:
    """The cache key of one view: the data's key (weights, transform, data) plus seed, K and view."""
    return hashlib.sha256(f"{base}|views={views}|seed={seed}|view={view}".encode()).hexdigest()[:32]


class SeededView(Dataset[Any]):
    """``data`` whose sample ``i`` is drawn with torch, Python and NumPy seeded from ``(seed, view, i)``.

    Seeding per sample (rather than per worker or per pass) makes view ``view`` the same tensors
    whichever process reads which sample, so it can be recomputed identically after a resume, and
    so that the features do not depend on ``num_workers`` or on the number of torchrun processes.
    It changes the global generators of whichever process reads it; the feature pass restores the
    main process's afterwards.
    """

    def __init__(self, data: Dataset[Any], seed: int, view: int) -> None:
        self.data, self.seed, self.view = data, seed, view

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed = sample_seed(self.seed, self.view, index)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.data[index]


def view_choice(seed: int, epoch: int, size: int, views: int) -> torch.Tensor:
    """Which of the ``views`` each of ``size`` samples is trained on in ``epoch``: ``[size]`` int64."""
    generator = torch.Generator().manual_seed(_mix("choice", seed, epoch))
    return torch.randint(views, (size,), generator=generator)


def view_batches(
    views: Sequence[FeatureSet],
    choice: torch.Tensor,
    order: list[int] | None,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(features, targets)`` batches in ``order``, each sample's row taken from its chosen view."""
    first = views[0]
    indices = torch.arange(len(first)) if order is None else torch.tensor(order, dtype=torch.long)
    for start in range(0, len(indices), batch_size):
        chosen = indices[start : start + batch_size]
        picks = choice[chosen]
        rows = torch.empty(
            (len(chosen), *first.features.shape[1:]), dtype=first.features.dtype, device=first.features.device
        )
        for number, view in enumerate(views):
            mask = picks == number
            if bool(mask.any()):
                taken = chosen[mask].to(view.features.device)
                rows[mask.to(rows.device)] = view.features.index_select(0, taken).to(rows.device)
        targets = first.targets.index_select(0, chosen.to(first.targets.device))
        yield rows.to(device, non_blocking=True), targets.to(device, non_blocking=True)
