"""The two figures of a report: the confusion matrix and the gallery of the worst errors."""

from __future__ import annotations

import math
import os
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ._plotting import pyplot
from ._transforms import IMAGENET_MEAN, IMAGENET_STD, unnormalize

if TYPE_CHECKING:
    from ._evaluation import Evaluation, SampleResult

__all__ = ["plot_confusion", "plot_errors", "thumbnail"]


def plot_confusion(evaluation: Evaluation, f: IO[bytes]) -> None:
    """Counts beside row-normalised fractions, class names on both axes, saved as PNG to ``f``."""
    plt = pyplot("write_report")
    names = evaluation.class_names
    counts = np.array(evaluation.metrics["confusion_matrix"], dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    n = len(names)
    side = min(max(4.5, 0.32 * n + 2.5), 16.0)  # a cell stays readable from 2 to ~40 classes
    font = 10 if n <= 10 else (8 if n <= 20 else 7)
    figure, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side + 0.6), constrained_layout=True)
    for ax, values, title, fmt in (
        (axes[0], counts, "Counts", "d"),
        (axes[1], fractions, "Row-normalised (recall on the diagonal)", ".2f"),
    ):
        image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)  # one scale: the row fraction
        ax.set_title(title)
        ax.set_xticks(range(n), names, rotation=90 if n > 6 else 0, fontsize=font)
        ax.set_yticks(range(n), names, fontsize=font)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if n <= 25:  # beyond that the numbers would overlap; the colours still tell
            for (i, j), value in np.ndenumerate(values):
                dark = fractions[i, j] > 0.6
                ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=font,
                        color="white" if dark else "black")  # fmt: skip
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class")
    figure.savefig(f, format="png", dpi=100)
    plt.close(figure)


def plot_errors(evaluation: Evaluation, f: IO[bytes], top: int) -> None:
    """The ``top`` highest-loss errors in a grid, or a note that there are none; PNG to ``f``."""
    plt = pyplot("write_report")
    errors = evaluation.errors[:top]
    names = evaluation.class_names
    if not errors:
        figure = plt.figure(figsize=(6, 2))
        count = evaluation.metrics["count"]
        figure.text(0.5, 0.5, f"No misclassified samples:\nall {count} were classified correctly.",
                    ha="center", va="center", fontsize=14)  # fmt: skip
        figure.savefig(f, format="png", dpi=100)
        plt.close(figure)
        return
    columns = min(4, len(errors))
    rows = math.ceil(len(errors) / columns)
    # At least two columns wide, so that the two-line title fits above one or a few errors.
    width = max(3.2 * columns, 6.4)
    figure, axes = plt.subplots(rows, columns, figsize=(width, 3.5 * rows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, errors, strict=False):
        ax.imshow(thumbnail(evaluation.data, sample))
        ax.set_title(
            f"{names[sample.true]} / {names[sample.predicted]} / {sample.probability:.2f}", fontsize=10
        )
    figure.suptitle(
        f"Worst {len(errors)} of {len(evaluation.errors)} error{'s' * (len(evaluation.errors) != 1)} by loss\n"
        f"true / predicted / probability of the prediction"
    )
    figure.tight_layout()
    figure.savefig(f, format="png", dpi=100)
    plt.close(figure)


def thumbnail(data: Any, sample: SampleResult) -> np.ndarray[Any, Any]:
    """The sample's picture as ``[H, W, 3]`` floats in [0, 1]: its file when known, else the dataset's tensor."""
    if sample.path is not None and os.path.isfile(sample.path):
        try:
            with Image.open(sample.path) as image:
                image = image.convert("RGB")
                image.thumbnail((256, 256))
                return np.asarray(image, dtype=np.float32) / 255.0
        except OSError:  # a file that cannot be drawn: fall back to what the model saw
            pass
    picture = data[sample.index][0]
    if not isinstance(picture, torch.Tensor) or picture.ndim != 3:
        return np.full((32, 32, 3), 0.5, dtype=np.float32)  # nothing drawable: a grey square
    picture = picture.detach().cpu()
    if not picture.is_floating_point():
        picture = picture.float() / 255.0
    elif picture.shape[0] == 3:
        picture = unnormalize(picture, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    else:  # another normalisation: stretch to [0, 1] to show the pattern
        picture = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-12)
    if picture.shape[0] == 1:
        picture = picture.expand(3, -1, -1)
    return picture[:3].permute(1, 2, 0).clamp(0, 1).numpy()
