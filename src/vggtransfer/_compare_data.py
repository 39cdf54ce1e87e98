"""The data of a backbone comparison: read and checked once, preprocessed for each backbone.

Datasets of tensors are used as they are for every backbone. Image folders and Datasets of PIL
images are preprocessed for each backbone as its weights expect (:func:`default_transform`), in a
way that keeps the feature cache's disk key: a dataset with a ``transform`` attribute (ImageFolder,
:class:`vggtransfer.data.ImageList`) is shallow-copied with that attribute replaced, so its
``samples`` still identify the files, and a selection of samples stays a ``Subset``.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ._labels import dataset_labels
from ._sources import check_data
from .data import DogsVsCats

__all__ = ["ComparisonData", "PreparedSet", "prepare_data", "stratified_positions"]

_CALLER = "compare_backbones"


class _Preprocessed(Dataset[tuple[torch.Tensor, Any]]):
    """A Dataset of (PIL image, label) with a backbone's preprocessing applied to the image.

    ``transform`` is an attribute, as ImageFolder has, so that the feature cache can see that
    it is a deterministic :class:`ImageTransform`; the images themselves are taken to be the
    same for the same index every time, as files are.
    """

    def __init__(self, inner: Dataset[Any], transform: Callable[[Any], torch.Tensor]) -> None:
        self.inner, self.transform = inner, transform

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.inner[index]
        return self.transform(image), label


@dataclass(frozen=True)
class PreparedSet:
    """One data set of the comparison: where its samples come from and how to preprocess them.

    Attributes:
        root: The dataset under any ``Subset`` layers (a folder read as :class:`DogsVsCats`).
        indices: The positions in ``root`` used, in order; None for all of them.
        images: Whether samples are PIL images, preprocessed for each backbone.
        labels: The label of every sample used, in order.
    """

    root: Dataset[Any]
    indices: list[int] | None
    images: bool
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def for_backbone(self, transform: Callable[[Any], torch.Tensor]) -> Dataset[Any]:
        """The Dataset to train or evaluate on, with ``transform`` applied to images."""
        data: Dataset[Any] = self.root
        if self.images and hasattr(self.root, "transform"):
            data = copy.copy(self.root)
            data.transform = transform  # type: ignore[attr-defined]
        elif self.images:
            data = _Preprocessed(self.root, transform)
        return data if self.indices is None else Subset(data, self.indices)

    def subset(self, positions: list[int]) -> PreparedSet:
        """The samples at ``positions`` of this set."""
        indices = [self.indices[p] for p in positions] if self.indices is not None else positions
        return PreparedSet(self.root, indices, self.images, [self.labels[p] for p in positions])


@dataclass(frozen=True)
class ComparisonData:
    """Training and validation data of a comparison, their classes, and what ``max_images`` did.

    Attributes:
        train_positions: The positions in the given training data that ``max_images`` kept;
            None when all are used.
        val_positions: The same for the validation data.
    """

    train: PreparedSet
    val: PreparedSet
    num_classes: int
    class_names: list[str] | None
    train_positions: list[int] | None = None
    val_positions: list[int] | None = None


def prepare_data(train: object, val: object, max_images: int | None, seed: int) -> ComparisonData:
    """Read folders, check both sets and their labels, and cut them to ``max_images``.

    Raises:
        TypeError, ValueError, FileNotFoundError: what the data is not, named and explained.
    """
    train_set, names = _prepare(train, "train")
    val_set, val_names = _prepare(val, "val")
    if names is not None and val_names is not None and names != val_names:
        raise ValueError(
            f"{_CALLER}: the training data's classes {names} differ from the validation data's "
            f"{val_names}; labels would be compared across different classes. Give both the same classes"
        )
    num_classes = len(names) if names is not None else max(train_set.labels) + 1
    if num_classes < 2 or len(set(train_set.labels)) < 2:
        raise ValueError(
            f"{_CALLER}: the training data has {len(set(train_set.labels))} class(es) "
            f"{sorted(set(train_set.labels))}; a classifier needs at least two: add data of another class"
        )
    outside = sorted({label for label in val_set.labels if label >= num_classes})
    if outside:
        raise ValueError(
            f"{_CALLER}: the validation data has labels {outside} but the training data has "
            f"{num_classes} classes (labels 0 to {num_classes - 1}); give both sets the same classes"
        )
    if max_images is not None and max_images < len(train_set):
        present = len(set(train_set.labels))
        if max_images < present:
            raise ValueError(
                f"{_CALLER}: expected max_images to be at least the number of classes in the training "
                f"data ({present}), so that each keeps an image, but got {max_images}"
            )
        val_count = min(len(val_set), math.ceil(len(val_set) * max_images / len(train_set)))
        kept_train = stratified_positions(train_set.labels, max_images, seed)
        kept_val = stratified_positions(val_set.labels, val_count, seed)
        return ComparisonData(
            train_set.subset(kept_train), val_set.subset(kept_val), num_classes, names, kept_train, kept_val
        )
    return ComparisonData(train_set, val_set, num_classes, names)


def _prepare(data: object, role: str) -> tuple[PreparedSet, list[str] | None]:
    """One set checked: a folder read, a Dataset's first sample and labels inspected."""
    what = f"{_CALLER}({role})"
    if isinstance(data, (str, os.PathLike)):
        data = _read_folder(Path(data), what)
    if isinstance(data, DataLoader):
        raise TypeError(
            f"{what}: expected a Dataset or a folder but got a DataLoader; pass its dataset "
            f"(compare_backbones batches it with batch_size and preprocesses it for each backbone)"
        )
    if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        raise TypeError(
            f"{what}: expected a folder of images (str or os.PathLike) or a torch Dataset of "
            f"(image, label) samples but got {type(data).__name__}"
        )
    if len(data) == 0:
        raise ValueError(f"{what}: the dataset is empty; expected at least one (image, label) sample")
    root, indices = _unwrap(data)
    images = _yields_images(data, root, what)
    if not images:
        check_data(data, what, 1)  # tensors and int labels, with the Trainer's messages
    labels = dataset_labels(data, what)
    classes = getattr(root, "classes", None)
    names = list(classes) if isinstance(classes, (list, tuple)) and classes else None
    if names is not None and not all(isinstance(name, str) for name in names):
        names = None
    return PreparedSet(root, indices, images, labels), names


def _read_folder(folder: Path, what: str) -> DogsVsCats:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what}: the folder {str(folder)!r} does not exist or is not a folder; expected a folder of "
            f"images (one folder per class) or a Dataset"
        )
    dataset = DogsVsCats(folder, progress=False)
    if not dataset.labelled:
        raise ValueError(
            f"{what}: the folder {str(folder)!r} holds unlabelled images (no class folders, no cat./dog. "
            f"names); expected one folder per class, such as {str(folder / 'cats')!r} and "
            f"{str(folder / 'dogs')!r}"
        )
    return dataset


def _unwrap(data: Dataset[Any]) -> tuple[Dataset[Any], list[int] | None]:
    """The dataset under any Subsets, and the positions in it that ``data`` covers."""
    root: Any = data
    indices: list[int] | None = None
    while isinstance(root, Subset):
        indices = [int(root.indices[i]) for i in indices] if indices is not None else list(root.indices)
        root = root.dataset
    return root, None if indices is None else [int(i) for i in indices]


def _yields_images(data: Dataset[Any], root: Dataset[Any], what: str) -> bool:
    """Whether the samples are PIL images (to preprocess per backbone) rather than tensors."""
    sample = data[0]
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        return False  # check_data explains what a sample must be
    if not isinstance(sample[0], Image.Image):
        return False
    transform = getattr(root, "transform", None)
    if transform is not None:
        raise ValueError(
            f"{what}: the dataset yields PIL images through its own transform {type(transform).__name__}, "
            f"but compare_backbones preprocesses PIL images for each backbone as its weights expect; "
            f"set its transform to None (each backbone's preprocessing is then used) or to one that "
            f"returns tensors (then used for every backbone)"
        )
    return True


def stratified_positions(labels: list[int], count: int, seed: int) -> list[int]:
    """``count`` positions of ``labels``, each class keeping its share, drawn from ``seed``; sorted.

    Every class keeps at least one position when ``count`` allows; the rest is shared in
    proportion to the classes' sizes, largest remainders first.
    """
    if count >= len(labels):
        return list(range(len(labels)))
    members: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        members.setdefault(label, []).append(position)
    classes = sorted(members)
    base = {c: 1 if count >= len(classes) else 0 for c in classes}
    rest = count - sum(base.values())
    pool = {c: len(members[c]) - base[c] for c in classes}
    exact = {c: rest * pool[c] / sum(pool.values()) for c in classes}
    quota = {c: base[c] + math.floor(exact[c]) for c in classes}
    by_remainder = sorted(classes, key=lambda c: (-(exact[c] - math.floor(exact[c])), c))
    for c in by_remainder[: count - sum(quota.values())]:
        quota[c] += 1
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c in classes:
        order = torch.randperm(len(members[c]), generator=generator).tolist()
        chosen += [members[c][i] for i in order[: quota[c]]]
    return sorted(chosen)
