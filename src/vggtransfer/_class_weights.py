"""Class weights for an imbalanced training set: the setting, the weights in effect, the weighted loss.

``Trainer(class_weights=...)`` weights the training loss as Keras' ``class_weight`` does: each
sample's cross-entropy counts in proportion to its class's weight, the batch loss being the
weighted mean of ``nn.CrossEntropyLoss(weight=w)``. Validation and :meth:`Trainer.evaluate`
losses stay unweighted, so that they remain comparable between runs with other weights.
``"balanced"`` is resolved at ``fit`` from the training labels, read without decoding images
where the data says what they are (``_labels.dataset_labels``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional

from ._labels import dataset_labels

__all__ = [
    "ClassWeights",
    "ClassWeightsSetting",
    "WeightedCrossEntropy",
    "balanced_weights",
    "check_class_weights",
]

#: What ``Trainer(class_weights=...)`` takes.
ClassWeightsSetting = Literal["balanced"] | Sequence[float] | None

_ALLOWED = "None, 'balanced', or one weight per class (a list of numbers >= 0, such as [1.0, 4.0])"


def check_class_weights(
    value: object, *, loss_fn: object, outputs: int | None, class_names: Sequence[str] | None
) -> Literal["balanced"] | list[float] | None:
    """``class_weights`` as the Trainer keeps it: None, ``"balanced"`` or a list of floats.

    Args:
        value: What the user passed.
        loss_fn: The user's loss; class weights apply to the default cross-entropy only.
        outputs: The model's class count when known.
        class_names: The class names when given, for the count when ``outputs`` is unknown.

    Raises:
        TypeError: not a string, list, tuple or 1-D array of numbers (a bool, a dict, a 2-D tensor).
        ValueError: another string, a negative or non-finite weight, all weights 0, not one weight
            per class, or a custom ``loss_fn`` as well.
    """
    if value is None:
        return None
    if loss_fn is not None:
        raise ValueError(
            "Trainer: class_weights weights the default cross-entropy loss, but a custom loss_fn was "
            "given too; leave class_weights out and weight your loss yourself, e.g. "
            "loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([1.0, 4.0]))"
        )
    if isinstance(value, str):
        if value != "balanced":
            raise ValueError(f"Trainer: expected class_weights to be {_ALLOWED} but got {value!r}")
        return "balanced"
    weights = _as_list(value)
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(
                f"Trainer: expected every class weight to be a number but class_weights[{index}] is "
                f"{weight!r} ({type(weight).__name__})"
            )
        if not (math.isfinite(weight) and float(weight) >= 0):
            raise ValueError(
                f"Trainer: expected every class weight to be a finite number >= 0 but "
                f"class_weights[{index}] is {weight!r}"
            )
    classes = outputs if outputs is not None else (len(class_names) if class_names is not None else None)
    if classes is not None and len(weights) != classes:
        raise ValueError(
            f"Trainer: got {len(weights)} class_weights {[float(w) for w in weights]} but the model has "
            f"{classes} classes; give one weight per class, in output order, or class_weights='balanced'"
        )
    if not weights or not any(weights):
        raise ValueError(
            f"Trainer: expected at least one class weight > 0 but got {list(weights)!r}: the loss "
            f"would be 0 and nothing would be learnt"
        )
    return [float(weight) for weight in weights]


def _as_list(value: object) -> list[Any]:
    """A list, tuple or 1-D tensor / numpy array as a list of its items; anything else refused."""
    if isinstance(value, torch.Tensor) or (hasattr(value, "tolist") and hasattr(value, "ndim")):
        array: Any = value
        dims, dtype = array.ndim, array.dtype
        if dims != 1 or dtype in (torch.bool, bool) or str(dtype) == "bool":
            raise TypeError(
                f"Trainer: expected class_weights as a tensor or array to be 1-D and of numbers but got "
                f"{dims}-D of {dtype}; pass one weight per class, such as torch.tensor([1.0, 4.0])"
            )
        return list(array.tolist())
    if isinstance(value, dict):
        raise TypeError(
            f"Trainer: expected class_weights to be {_ALLOWED} but got a dict ({value!r:.80}); list the "
            f"weights in class order instead, e.g. [weights[c] for c in range(num_classes)]"
        )
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"Trainer: expected class_weights to be {_ALLOWED} but got {value!r:.80} ({type(value).__name__})"
        )
    return list(value)


def balanced_weights(labels: Sequence[int], classes: int, names: Sequence[str] | None = None) -> list[float]:
    """``n_samples / (n_present * count_c)`` per class, as scikit-learn's and Keras' "balanced".

    ``n_present`` counts the classes that have samples, so that balanced data gets weight 1.0 for
    each. A class without samples gets weight 0 (nothing of it is in the loss anyway) and a warning.

    Raises:
        ValueError: a label outside ``[0, classes)``.
    """
    outside = sorted({label for label in labels if label >= classes})
    if outside:
        raise ValueError(
            f"fit: the training data has labels {outside[:10]} but the model has {classes} classes "
            f"(labels 0 to {classes - 1}); build the head for the data's classes"
        )
    counts = [0] * classes
    for label in labels:
        counts[label] += 1
    present = sum(1 for count in counts if count)
    for label in (c for c in range(classes) if not counts[c]):
        name = f"{names[label]!r} (label {label})" if names is not None else f"label {label}"
        warnings.warn(
            f"fit: class_weights='balanced': class {name} has no training samples, so its weight is 0 "
            f"and the model cannot learn it from this data; add samples of it",
            UserWarning,
            stacklevel=4,
        )
    return [len(labels) / (present * count) if count else 0.0 for count in counts]


class WeightedCrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss(weight=w)``, with clear errors, and loss 0 (not NaN) for a batch that weighs 0.

    With every weight > 0 it is exactly ``nn.CrossEntropyLoss(weight=w)``. A weight of 0 lets a
    batch of only such classes weigh 0 in all, where the weighted mean is 0 / 0: its loss is
    then 0 and its gradient 0, rather than NaN (the same mean otherwise, up to float rounding).
    """

    def __init__(self, weights: Sequence[float], device: torch.device) -> None:
        super().__init__(weight=torch.tensor(list(weights), dtype=torch.float32, device=device))
        self.some_zero = min(weights) == 0

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted mean cross-entropy of the batch."""
        weight = self.weight
        assert weight is not None
        if input.ndim != 2 or input.shape[1] != weight.numel():
            raise ValueError(
                f"fit: got {weight.numel()} class_weights but the model gives logits of shape "
                f"{tuple(input.shape)}; give one weight per output class"
            )
        if not self.some_zero:
            return super().forward(input, target)
        total = functional.cross_entropy(input, target, weight=weight, reduction="sum")
        weight_sum = weight.to(total.dtype)[target].sum()
        # The mean's denominator; 1 where every sample weighs 0, where the sum is 0 too.
        return total / torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))


class ClassWeights:
    """A Trainer's class-weight setting, the weights in effect, and the training loss they make.

    Args:
        setting: The checked ``class_weights`` (see :func:`check_class_weights`).
    """

    def __init__(self, setting: Literal["balanced"] | list[float] | None) -> None:
        self.setting = setting
        #: The weights in effect: the given ones, "balanced"'s once resolved, or None.
        self.weights: list[float] | None = list(setting) if isinstance(setting, list) else None

    def training_loss(
        self,
        data: Any,
        default: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        outputs: int | None,
        names: Sequence[str] | None,
        device: torch.device,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The loss to train on ``data`` with: weighted (resolving "balanced" from its labels), else ``default``."""
        if self.setting is None:
            return default
        if self.setting == "balanced":
            labels = dataset_labels(data, "fit: class_weights='balanced'")
            classes = outputs if outputs is not None else len(names) if names else max(labels) + 1
            self.weights = balanced_weights(labels, classes, names)
        assert self.weights is not None
        return WeightedCrossEntropy(self.weights, device)

    def state(self) -> dict[str, Any]:
        """The checkpoint's fields: the setting and the weights in effect."""
        return {"class_weights": self.setting, "class_weights_in_effect": self.weights}
