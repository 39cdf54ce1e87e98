"""Turning any image Pillow can open into the 8-bit RGB the pretrained networks expect."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["tensor_to_rgb", "to_rgb"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` upright and in 8-bit RGB, whatever its mode.

    * EXIF orientation is applied, so photos from phones are not sideways.
    * Transparent pixels (RGBA, LA, palette with transparency) are composited onto white
      rather than onto whatever colour the file stores under them (often black).
    * 16-bit and 32-bit greyscale (``I;16``, ``I``, ``F``) is scaled to 8 bits, not clipped,
      so a 16-bit PNG does not come out white.
    * CMYK, palette, 1-bit, YCbCr and the rest go through Pillow's own conversion.

    The input is never modified.

    Example:
        >>> from PIL import Image
        >>> from vggtransfer import to_rgb
        >>> to_rgb(Image.new("CMYK", (4, 4))).mode
        'RGB'

    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer or float greyscale to 0..255 by the range its type implies."""
    values = array.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if (array.dtype.kind == "u" and array.dtype.itemsize == 2) or 255.0 < top <= 65535.0:
        scale = 65535.0
    elif top <= 255.0:
        scale = 255.0
    else:
        scale = top  # 32-bit data beyond 16 bits: stretch what is there
    return np.clip(np.rint(values * (255.0 / scale)), 0, 255).astype(np.uint8)


def tensor_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """Give a ``[C, H, W]`` or ``[B, C, H, W]`` image tensor three channels.

    One channel is repeated; a fourth (alpha) channel is dropped.
    """
    channels = image.shape[-3]
    if channels == 3:
        return image
    if channels == 1:
        return image.expand(*image.shape[:-3], 3, *image.shape[-2:])
    if channels == 4:
        return image[..., :3, :, :]
    raise ValueError(
        f"expected an image tensor with 1, 3 or 4 channels in dimension -3 (shape [C, H, W] or "
        f"[B, C, H, W]) but got shape {list(image.shape)}"
    )
