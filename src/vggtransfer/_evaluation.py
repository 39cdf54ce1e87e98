"""Per-sample evaluation: which samples a trained model gets wrong, and how badly.

:func:`evaluate_samples` runs the Trainer's model over a dataset in order and keeps, for each
sample, its label, the prediction, both probabilities and the loss. :class:`Evaluation` holds
them with the metrics ``Trainer.evaluate`` reports, and writes the analysis files (see
:mod:`vggtransfer._report`).
"""

from __future__ import annotations

import os
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ._arguments import check_positive_int, check_workers
from ._heads import output_count
from ._metrics import ConfusionMatrix
from ._predict import names_for
from ._progress import Silent, task_bar
from ._runtime import eval_mode
from ._sources import check_data, make_loader

if TYPE_CHECKING:
    from ._trainer import Trainer

__all__ = ["Evaluation", "SampleResult", "evaluate_samples", "sample_path"]


@dataclass(frozen=True)
class SampleResult:
    """How the model did on one sample.

    Attributes:
        index: The sample's index in the evaluated dataset.
        path: Its image file when the dataset lists ``samples`` (ImageFolder, vggtransfer.data's
            datasets, also through ``Subset``), else None.
        true: The true class index.
        predicted: The predicted class index (the arg-max).
        probability: Softmax probability of the prediction.
        true_probability: Softmax probability of the true class.
        loss: Cross-entropy of the sample, ``-log(true_probability)``.
    """

    index: int
    path: str | None
    true: int
    predicted: int
    probability: float
    true_probability: float
    loss: float


@dataclass(frozen=True)
class Evaluation:
    """Per-sample results on a dataset and the metrics of ``Trainer.evaluate`` computed from them.

    Attributes:
        samples: One :class:`SampleResult` per sample, in dataset order.
        class_names: The name of every class index.
        metrics: ``accuracy``, ``balanced_accuracy``, ``loss``, ``count``, ``confusion_matrix``
            and ``per_class`` (precision, recall, f1, support), as ``Trainer.evaluate`` returns.
        data: The evaluated dataset, read again for the images of the error gallery.
    """

    samples: list[SampleResult]
    class_names: list[str]
    metrics: dict[str, Any]
    data: Any = None

    @property
    def errors(self) -> list[SampleResult]:
        """The misclassified samples, highest loss first (ties: dataset order)."""
        wrong = [s for s in self.samples if s.predicted != s.true]
        return sorted(wrong, key=lambda s: (-s.loss, s.index))

    def write_report(
        self,
        folder: str | os.PathLike[str],
        *,
        top: int = 16,
        scan: Any = None,
        model: str | None = None,
        timings: dict[str, float] | None = None,
        command: str | None = None,
        summary: str | None = None,
    ) -> dict[str, Path]:
        """Write confusion_matrix.png, errors.png, misclassified.csv and report.md into ``folder``.

        See :func:`vggtransfer.write_report` for the files and the arguments.
        """
        from ._report import ReportOptions, write_files  # the writer needs this class: imported when used

        options = ReportOptions(top, scan, model, timings, command, summary)
        return write_files(self, options.check(folder, "Evaluation.write_report"), options)


def sample_path(data: Any, index: int) -> str | None:
    """The file of sample ``index``: through any ``Subset``, from the ``samples`` list ImageFolder has."""
    while isinstance(data, Subset):
        data, index = data.dataset, int(data.indices[index])
    samples = getattr(data, "samples", None)
    if isinstance(samples, (list, tuple)) and 0 <= index < len(samples):
        entry = samples[index]
        path = entry[0] if isinstance(entry, (list, tuple)) else entry
        if isinstance(path, (str, os.PathLike)):
            return str(path)
    return None


def evaluate_samples(
    trainer: Trainer, data: Dataset[Any], *, batch_size: int = 32, num_workers: int | None = 0
) -> Evaluation:
    """Evaluate ``trainer``'s model on ``data`` sample by sample, in evaluation mode without gradients.

    It reads the images (cached features are not used: the gallery needs the samples in order)
    and restores the model's mode after. Metrics are those of ``Trainer.evaluate``, with the loss
    as cross-entropy. Under torchrun it refuses: run it in one process, e.g. after training.

    Args:
        trainer: The Trainer whose model, device, precision and class names are used.
        data: A Dataset of ``(image, label)``, as for ``evaluate`` (a DataLoader is refused: its
            order may be shuffled, and the indices must be the dataset's).
        batch_size: Samples per forward pass.
        num_workers: DataLoader workers (None: as ``fit`` chooses).

    Returns:
        An :class:`Evaluation`; ``write_report`` writes its files.

    Raises:
        TypeError: ``trainer`` is not a Trainer, or ``data`` not a Dataset of (image, label).
        ValueError: a bad ``batch_size``/``num_workers``, an empty dataset, a DataLoader, or torchrun.

    Example:
        >>> import torch, vggtransfer as vt
        >>> from torch.utils.data import TensorDataset
        >>> model = vt.replace_classifier(vt.create_model("resnet18", weights=None), 2)
        >>> trainer = vt.Trainer(model, device="cpu", seed=0, progress=False)
        >>> data = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
        >>> result = vt.evaluate_samples(trainer, data, batch_size=2)
        >>> len(result.samples), result.metrics["count"]
        (4, 4)
    """
    names, loader = _checked(trainer, data, batch_size, num_workers)
    confusion = ConfusionMatrix(len(names), torch.device("cpu"))
    results: list[SampleResult] = []
    runtime = trainer.runtime
    shown = not isinstance(trainer.progress, Silent)
    with (
        eval_mode(trainer.model),
        torch.no_grad(),
        task_bar(_size(data), "evaluate", enabled=shown) as advance,
    ):
        for inputs, targets in loader:
            advance(int(targets.shape[0]))
            with runtime.autocast():
                logits = trainer.model(runtime.to_device(inputs))
            logits, targets = logits.float().cpu(), targets.long()
            _check_labels(targets, len(names))
            confusion.update(logits, targets)
            log_p = logits.log_softmax(dim=1)
            top, predicted = log_p.max(dim=1)
            true_log_p = log_p.gather(1, targets.view(-1, 1)).squeeze(1)
            for row in range(targets.shape[0]):
                index = len(results)
                results.append(
                    SampleResult(
                        index,
                        sample_path(data, index),
                        int(targets[row]),
                        int(predicted[row]),
                        float(top[row].exp()),
                        float(true_log_p[row].exp()),
                        float(-true_log_p[row]),
                    )
                )
    count = len(results)
    metrics = {
        "loss": sum(s.loss for s in results) / count,
        "accuracy": sum(s.true == s.predicted for s in results) / count,
        "count": count,
        **confusion.report(names),
    }
    return Evaluation(results, names, metrics, data)


def _size(data: object) -> int | None:
    return len(data) if isinstance(data, Sized) else None


def _checked(
    trainer: Trainer, data: Any, batch_size: int, num_workers: int | None
) -> tuple[list[str], DataLoader[Any]]:
    """Refuse bad arguments before any work; the class names and an in-order loader."""
    from ._trainer import Trainer  # the Trainer module is large; only its class is needed here

    what = "evaluate_samples"
    if not isinstance(trainer, Trainer):
        raise TypeError(f"{what}: expected a vggtransfer Trainer but got {type(trainer).__name__}")
    if trainer.world_size > 1:
        raise ValueError(
            f"{what}: expected one process but this runs under torchrun with {trainer.world_size}; "
            f"evaluate per sample in a single process (e.g. load best.pt with vt.load_model after training)"
        )
    if isinstance(data, DataLoader):
        raise ValueError(
            f"{what}: expected a Dataset but got a DataLoader; pass its dataset (loader.dataset) so that "
            f"sample indices and paths are the dataset's"
        )
    batch_size = check_positive_int(batch_size, "batch_size", what)
    num_workers = check_workers(num_workers, what)
    check_data(data, what, 1)
    names = names_for(trainer.class_names, output_count(trainer.network))
    loader = make_loader(
        data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        seed=trainer.seed if trainer.seed is not None else 0, pin_memory=False, what=what,
    )  # fmt: skip
    return names, loader


def _check_labels(targets: torch.Tensor, classes: int) -> None:
    """A label the model has no output for would otherwise fail deep inside torch."""
    bad = targets[(targets < 0) | (targets >= classes)]
    if bad.numel():
        raise ValueError(
            f"evaluate_samples: expected labels in 0..{classes - 1} (the model has {classes} outputs) "
            f"but got {int(bad[0])}; check the dataset's labels against the model's head"
        )
