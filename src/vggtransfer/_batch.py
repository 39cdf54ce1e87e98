"""What a batch must be: images of one size and integer labels in range, checked with clear errors.

Left to itself PyTorch reports these mistakes from deep inside: ``default_collate`` fails with
"stack expects each tensor to be equal size", an out-of-range label with a CUDA assert or an
``IndexError`` in the loss, ``-100`` (cross-entropy's ignore index) is silently skipped by the
loss and then breaks the confusion matrix, and float labels are silently truncated. The checks
here run on the CPU, before a batch reaches the device, and say which sample or label is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Subset, TensorDataset, default_collate

__all__ = ["BatchError", "BatchTypeError", "check_known_labels", "check_targets", "collate_checked"]

_ORIGINAL = "BatchError: "


class _WorkerSafeMessage(Exception):
    """Keeps its own message when PyTorch re-raises it from a loader worker.

    The re-raise rebuilds the exception from the worker's whole traceback text ("Caught ... in
    DataLoader worker process 0. Original Traceback ..."); only the original message is kept.
    """

    def __init__(self, message: str) -> None:
        if "\nOriginal Traceback" in message and _ORIGINAL in message:
            message = message.rsplit(_ORIGINAL, 1)[1].strip()
        super().__init__(message)


class BatchError(_WorkerSafeMessage, ValueError):
    """A batch that cannot be trained on: images of mixed sizes, or labels out of range."""


class BatchTypeError(_WorkerSafeMessage, TypeError):
    """A batch whose labels are not integer class indices (float or bool)."""


def collate_checked(samples: Sequence[Any], *, what: str, class_labels: bool = True) -> Any:
    """``default_collate``, after checking that the images have one shape and, for class labels, their kind."""
    shapes = [tuple(sample[0].shape) for sample in samples if isinstance(sample[0], torch.Tensor)]
    if len(set(shapes)) > 1:
        other = next(i for i, shape in enumerate(shapes) if shape != shapes[0])
        raise BatchError(
            f"{what}: the images of one batch have different sizes, {list(shapes[0])} and "
            f"{list(shapes[other])}, so they cannot be stacked; give the dataset a transform that "
            f"gives every image one size, e.g. vt.imagenet_transform() (resize and centre crop)"
        )
    batch = default_collate(list(samples))
    if class_labels and isinstance(batch, (list, tuple)) and len(batch) == 2:
        _check_label_kind(batch[1], what)
    return batch


def _check_label_kind(targets: Any, what: str) -> None:
    if isinstance(targets, torch.Tensor) and (
        targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex()
    ):
        raise BatchTypeError(
            f"{what}: expected integer class indices as labels but got a {targets.dtype} tensor; "
            f"labels are not rounded or converted, so pass ints (0, 1, ...), e.g. torch.tensor(labels, dtype=torch.long)"
        )


def check_targets(targets: Any, outputs: int | None, what: str) -> None:
    """Refuse labels that are not integer class indices in ``[0, outputs)``.

    Raises:
        TypeError: labels that are not integer tensors (float, bool).
        ValueError: a label below 0 (including -100) or at least ``outputs``.
    """
    if not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"{what}: expected the labels of a batch to be a tensor but got {type(targets).__name__}"
        )
    _check_label_kind(targets, what)
    if outputs is None or targets.numel() == 0:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= outputs:
        bad = low if low < 0 else high
        hint = (
            " (-100 is cross-entropy's ignore_index, which vggtransfer does not support: leave such "
            "samples out)"
            if bad == -100
            else ""
        )
        raise BatchError(
            f"{what}: label {bad} is out of range for a model with {outputs} outputs; labels must be "
            f"class indices 0 to {outputs - 1}{hint}. Build the head for the number of classes, "
            f"vt.replace_classifier(model, num_classes), or fix the labels"
        )


def check_known_labels(data: Any, check: Callable[[torch.Tensor], None]) -> None:
    """Check every label up front where they are known without reading images.

    That is a ``TensorDataset``'s label tensor, or the ``targets`` / ``samples`` of ImageFolder,
    vggtransfer's ImageList and DogsVsCats, also through ``Subset``. Other datasets are checked
    batch by batch.
    """
    indices = None
    while isinstance(data, Subset):
        indices = [data.indices[i] for i in indices] if indices is not None else list(data.indices)
        data = data.dataset
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        labels = data.tensors[1]
    elif isinstance(getattr(data, "targets", None), list):
        labels = torch.as_tensor(data.targets)
    elif isinstance(getattr(data, "samples", None), list):
        found = [
            sample[1] if isinstance(sample, tuple) and len(sample) == 2 else None for sample in data.samples
        ]
        if not all(isinstance(label, int) and not isinstance(label, bool) for label in found):
            return  # unlabelled data (ids as labels) or an unknown layout: checked batch by batch
        labels = torch.as_tensor(found, dtype=torch.long)
    else:
        return
    if indices is not None:
        labels = labels[torch.as_tensor(indices, dtype=torch.long)]
    check(labels)
