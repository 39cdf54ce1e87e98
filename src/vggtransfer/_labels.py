"""The labels of a dataset, read without decoding its images wherever the dataset records them.

Both ``Trainer(class_weights="balanced")`` and ``compare_backbones`` (its class-stratified
subsets) need every label before training; decoding every image for that would cost a pass over
the files, so the labels that ImageFolder, vggtransfer's ImageList and a TensorDataset keep are
read instead, also through ``Subset`` chains.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from ._rng import preserved_rng

__all__ = ["dataset_labels", "recorded_labels"]


def dataset_labels(data: Any, what: str) -> list[int]:
    """Every label of ``data`` (a Dataset or a DataLoader), in dataset order, as class indices.

    Read without decoding images where the data says what its labels are: a ``TensorDataset``'s
    label tensor, the ``targets`` or ``samples`` of ImageFolder and vggtransfer's ImageList and
    DogsVsCats, also through ``Subset`` and a DataLoader's ``dataset``. Any other dataset is read
    sample by sample (one decode of every image), and an iterable DataLoader batch by batch.

    Args:
        data: The dataset or loader.
        what: Who asks, for the error, e.g. ``"fit: class_weights='balanced'"``.

    Raises:
        ValueError: a label that is not a class index (an int >= 0).
    """
    dataset = data.dataset if isinstance(data, DataLoader) else data
    found = recorded_labels(dataset)
    if found is None:
        with preserved_rng():  # a random transform draws numbers while samples are read
            if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
                found = [dataset[index][1] for index in range(len(dataset))]
            else:  # an iterable dataset: its loader is the only way to it
                found = [label for batch in data for label in torch.as_tensor(batch[1]).view(-1)]
    labels = []
    for position, label in enumerate(found):
        value = label.item() if isinstance(label, torch.Tensor) and label.ndim == 0 else label
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(
                f"{what}: expected every label to be a class index (an int >= 0) but sample {position} "
                f"has {label!r}"
            )
        labels.append(int(value))
    return labels


def recorded_labels(dataset: Any) -> list[Any] | None:
    """The labels a dataset records (under any Subsets), or None when it records none."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        indices = [int(dataset.indices[i]) for i in indices] if indices is not None else list(dataset.indices)
        dataset = dataset.dataset
    found: Any = None
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        found = dataset.tensors[1].tolist()
    elif isinstance(getattr(dataset, "targets", None), (list, tuple, torch.Tensor)):
        found = list(dataset.targets)
    elif isinstance(getattr(dataset, "samples", None), list):
        found = [s[1] if isinstance(s, tuple) and len(s) == 2 else None for s in dataset.samples]
    if found is None or not hasattr(dataset, "__len__") or len(found) != len(dataset):
        return None
    return found if indices is None else [found[i] for i in indices]
