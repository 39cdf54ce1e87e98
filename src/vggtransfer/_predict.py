"""Prediction: what users hand to ``predict`` (paths, PIL images, tensors), batched and classified."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from ._arguments import check_positive_int
from ._runtime import Runtime, eval_mode
from ._tta import check_tta, with_tta

__all__ = ["PredictInput", "Prediction", "as_items", "is_single", "names_for", "predict", "to_batch"]

#: One image: a file path, a PIL image, or a tensor ``[C, H, W]`` (uint8 = raw pixels, float =
#: already preprocessed). A list of these, or a float tensor ``[B, 3, H, W]``, is a batch.
PredictInput = Union[str, "os.PathLike[str]", Image.Image, torch.Tensor]


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one input.

    Attributes:
        label: The predicted class name (the index as a string when no names are known).
        index: The predicted class index.
        probabilities: Softmax probability of every class, by class name, in class order.
    """

    label: str
    index: int
    probabilities: dict[str, float]


def is_single(inputs: Any) -> bool:
    """True when ``inputs`` is one image rather than a batch."""
    if isinstance(inputs, torch.Tensor):
        return inputs.ndim == 3
    return isinstance(inputs, (str, os.PathLike, Image.Image))


def as_items(inputs: Any) -> list[Any]:
    """The inputs as a list of single images; raises TypeError for anything else."""
    if is_single(inputs):
        return [inputs]
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        return list(inputs)
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise TypeError(
            f"predict: expected an image path, a PIL image, a tensor [C, H, W] or [B, C, H, W], "
            f"or a non-empty list of these, but got {type(inputs).__name__}"
            + (f" of shape {list(inputs.shape)}" if isinstance(inputs, torch.Tensor) else "")
        )
    return list(inputs)


def to_batch(inputs: Any, transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """Return a float ``[B, 3, H, W]`` batch from one or many inputs.

    Paths are opened and closed here; images go through ``transform`` (which converts any
    PIL mode to RGB and applies EXIF orientation). Float tensors are taken as already
    preprocessed, uint8 tensors as raw pixels to transform.
    """
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        if inputs.dtype == torch.uint8:
            return torch.stack([transform(image) for image in inputs])
        return inputs
    images = [_one(item, transform) for item in as_items(inputs)]
    shapes = sorted({tuple(image.shape) for image in images})
    if len(shapes) > 1:
        raise ValueError(
            f"predict: the inputs have different sizes after preprocessing ({[list(s) for s in shapes]}), so "
            f"they cannot form one batch; pass paths or PIL images (the transform resizes them) or tensors "
            f"of one size"
        )
    return torch.stack(images)


def _one(item: Any, transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.exists() and not path.is_file():  # a folder, or a FIFO whose read would never end
            raise ValueError(f"predict: {str(path)!r} is not a regular file; give the path of an image file")
        try:
            with Image.open(path) as image:
                return transform(image)
        except FileNotFoundError:
            raise FileNotFoundError(f"predict: image file {str(path)!r} does not exist") from None
        except Image.DecompressionBombError as exc:
            raise ValueError(
                f"predict: refusing {str(path)!r}: {exc} Check the file, or raise PIL.Image.MAX_IMAGE_PIXELS "
                f"if such images are expected"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"predict: cannot read {str(path)!r} as an image ({exc})") from None
    if isinstance(item, Image.Image):
        return transform(item)
    if isinstance(item, torch.Tensor) and item.ndim == 3:
        return item if item.is_floating_point() else transform(item)
    raise TypeError(
        f"predict: expected each input to be an image path, a PIL image or a tensor [C, H, W] "
        f"but got {type(item).__name__}"
        + (f" of shape {list(item.shape)}" if isinstance(item, torch.Tensor) else "")
    )


def names_for(class_names: Sequence[str] | None, count: int) -> list[str]:
    """The names of ``count`` outputs: ``class_names`` if it has that many, else ``"0"``, ``"1"``, ..."""
    if class_names is not None and len(class_names) == count:
        return list(class_names)
    return [str(i) for i in range(count)]


def predict(
    model: nn.Module,
    inputs: PredictInput | Sequence[PredictInput],
    *,
    transform: Callable[[Any], torch.Tensor],
    class_names: Sequence[str] | None,
    runtime: Runtime,
    batch_size: int,
    tta: bool = False,
) -> Prediction | list[Prediction]:
    """Classify ``inputs`` in batches of ``batch_size``, in eval mode without gradients.

    The model's mode is restored afterwards. With ``tta``, the probabilities are the mean of
    the softmaxes of each preprocessed image and of its horizontal flip. Returns one
    :class:`Prediction` for one input, a list for a list or a batch tensor.

    Raises:
        TypeError: an input of an unknown kind, or ``tta`` not a bool.
        ValueError: ``batch_size`` is not a positive int, or a file is not an image.
        FileNotFoundError: a path does not exist.
    """
    batch_size = check_positive_int(batch_size, "batch_size", "predict")
    forward = with_tta(model, check_tta(tta, "predict"))
    single = is_single(inputs)
    chunks: list[Any]
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        chunks = list(torch.split(inputs, batch_size))
    else:
        items = as_items(inputs)
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    predictions: list[Prediction] = []
    with eval_mode(model), torch.no_grad():
        for chunk in chunks:
            batch = to_batch(chunk, transform).to(runtime.device)
            with runtime.autocast():
                logits = forward(batch)
            probabilities = logits.float().softmax(dim=1).cpu()
            names = names_for(class_names, probabilities.shape[1])
            for row in probabilities:
                index = int(row.argmax())
                predictions.append(
                    Prediction(names[index], index, dict(zip(names, row.tolist(), strict=True)))
                )
    return predictions[0] if single else predictions
