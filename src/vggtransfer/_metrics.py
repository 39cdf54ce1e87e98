"""Loss and accuracy bookkeeping, and the confusion matrix behind ``Trainer.evaluate``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["ConfusionMatrix", "RunningMean", "check_finite_loss"]


def check_finite_loss(loss: float, epoch: int, step: int, lr: float) -> None:
    """Stop training on a NaN or infinite loss, before the optimizer applies it.

    Raises:
        FloatingPointError: names the epoch, the step and the learning rate.
    """
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"fit: the loss became {loss} at epoch {epoch}, step {step}; training stopped "
            f"before the optimizer applied it and no checkpoint was written from this state. "
            f"Lower the learning rate (lr={lr:g} now) or check "
            f"the inputs and labels of this batch for NaN or out-of-range values"
        )


class RunningMean:
    """Sum of per-sample losses and correct predictions, kept as tensors on the device.

    The sums stay on the device so that bookkeeping adds no GPU->CPU synchronisation of its own;
    they are read once, at the end of the epoch. (The training loop still syncs once per step,
    for its NaN check on the loss.)
    """

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: ``loss`` is the batch mean, ``logits`` ``[B, C]``, ``targets`` ``[B]``."""
        batch = targets.shape[0]
        self.loss_sum += loss.detach().double() * batch
        self.correct += (logits.detach().argmax(dim=1) == targets).sum()
        self.count += batch

    def totals(self) -> torch.Tensor:
        """``[loss_sum, correct, count]`` as one float64 tensor, ready for an all-reduce."""
        return torch.stack(
            [
                self.loss_sum,
                self.correct.double(),
                torch.tensor(float(self.count), dtype=torch.float64, device=self.loss_sum.device),
            ]
        )

    @staticmethod
    def summarise(totals: torch.Tensor) -> dict[str, float]:
        """Mean loss and accuracy (a fraction in [0, 1]) from :meth:`totals`."""
        loss_sum, correct, count = (float(v) for v in totals.cpu())
        if count == 0:
            return {"loss": float("nan"), "accuracy": float("nan")}
        return {"loss": loss_sum / count, "accuracy": correct / count}


class ConfusionMatrix:
    """Counts of (true class, predicted class) pairs, with per-class precision, recall and F1."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch of ``[B, C]`` logits and ``[B]`` integer targets."""
        predicted = logits.argmax(dim=1)
        index = targets.long() * self.num_classes + predicted
        self.counts += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)

    def report(self, class_names: Sequence[str]) -> dict[str, Any]:
        """The matrix (rows: true class), per-class precision, recall, F1, support, and balanced accuracy.

        Precision and recall of a class that was never predicted, or never present, are 0.0, and
        so is F1 when precision + recall is 0. Balanced accuracy is the mean recall over the
        classes present in the data (support > 0): a class with no samples has no recall to
        average, so it is left out rather than counted as 0. It is NaN when no sample was seen.
        """
        counts = self.counts.cpu()
        true_positives = counts.diagonal()
        predicted = counts.sum(dim=0)
        actual = counts.sum(dim=1)
        per_class = {}
        recalls = []
        for i, name in enumerate(class_names):
            tp = int(true_positives[i])
            precision = tp / int(predicted[i]) if int(predicted[i]) else 0.0
            recall = tp / int(actual[i]) if int(actual[i]) else 0.0
            per_class[name] = {
                "precision": precision,
                "recall": recall,
                "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                "support": int(actual[i]),
            }
            if int(actual[i]):
                recalls.append(recall)
        balanced = sum(recalls) / len(recalls) if recalls else float("nan")
        return {"confusion_matrix": counts.tolist(), "per_class": per_class, "balanced_accuracy": balanced}
