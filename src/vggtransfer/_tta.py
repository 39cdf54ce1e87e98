"""Test-time augmentation: each image and its mirror image, their class probabilities averaged.

``evaluate(data, tta=True)`` and ``predict(inputs, tta=True)`` show the model every preprocessed
image twice, as it is and flipped left to right (the tensor reversed along its width axis, after
preprocessing), and take the mean of the two softmaxes as the prediction.

The wrapped forward returns the *log* of that mean rather than logits. Everything after it stays
as it is without TTA: its argmax is the argmax of the mean (accuracy, confusion matrix), its
softmax is the mean itself (``predict``), and cross-entropy of it is the negative log of the
averaged probability of the true class (``evaluate``'s loss). Averaging probabilities has no
meaning for other losses, so ``evaluate`` refuses TTA with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["TTA_CACHE_OFF", "check_tta", "flip_average", "with_tta"]

#: Why ``evaluate(tta=True)`` runs on the images, for :attr:`Trainer.cache_report`.
TTA_CACHE_OFF = "tta=True needs each image flipped, which cached features do not hold"


def check_tta(value: object, caller: str, loss_fn: object = None) -> bool:
    """``tta`` as a bool: exactly True or False; with ``loss_fn`` given, True needs cross-entropy.

    Raises:
        TypeError: ``value`` is not a bool.
        ValueError: ``value`` is True and ``loss_fn`` is given but is not an ``nn.CrossEntropyLoss``.
    """
    if isinstance(value, np.bool_):  # a numpy bool (from a config array) means the same
        value = bool(value)
    if not isinstance(value, bool):
        raise TypeError(
            f"{caller}: expected tta to be True (average the original and the horizontally flipped "
            f"view) or False but got {value!r} ({type(value).__name__})"
        )
    if value and loss_fn is not None and not isinstance(loss_fn, nn.CrossEntropyLoss):
        name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", "?")
        raise ValueError(
            f"{caller}: tta=True averages class probabilities, which needs loss_fn to be an "
            f"nn.CrossEntropyLoss (the loss is then the negative log of the averaged probability of the "
            f"true class), but the Trainer's loss_fn is {name}; evaluate with tta=False, or compute your "
            f"metric from predict(..., tta=True)'s probabilities"
        )
    return value


def flip_average(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` made to return ``log((softmax(forward(x)) + softmax(forward(x.flip(-1)))) / 2)``.

    The two views go through ``forward`` one after the other, at the batch size of ``x``: peak
    memory is that of one view, and a compiled model sees the shapes it was compiled for.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
        >>> x = torch.randn(5, 3, 2, 2)
        >>> mean = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
        >>> torch.allclose(flip_average(model)(x).softmax(1), mean, atol=1e-6)
        True
    """

    def averaged(inputs: torch.Tensor) -> torch.Tensor:
        original = forward(inputs).float().log_softmax(dim=1)
        flipped = forward(inputs.flip(-1)).float().log_softmax(dim=1)
        # log((p + q) / 2) from the logs, so that a probability too small for float32 keeps its
        # log instead of becoming log(0) = -inf (an infinite loss for one confident mistake).
        return torch.logaddexp(original, flipped) - math.log(2.0)

    return averaged


def with_tta(
    forward: Callable[[torch.Tensor], torch.Tensor], tta: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` as it is, or with ``tta`` its :func:`flip_average`."""
    return flip_average(forward) if tta else forward
