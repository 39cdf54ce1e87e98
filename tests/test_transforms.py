from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vggtransfer as vt


def test_eval_transform_is_resize_center_crop_normalize(pet_photos: list[Path]) -> None:
    transform = vt.imagenet_transform()
    assert (transform.size, transform.resize, transform.train) == (224, 256, False)
    with Image.open(pet_photos[0]) as image:
        out = transform(image)
        # the same computation written out with torchvision's functional API
        from torchvision.transforms.v2 import functional as F

        pixels = F.pil_to_tensor(image.convert("RGB"))
        ref = F.center_crop(F.resize(pixels, 256), 224)
        ref = F.normalize(ref.float() / 255, list(vt.IMAGENET_MEAN), list(vt.IMAGENET_STD))
        pil_resized = F.pil_to_tensor(F.center_crop(F.resize(image.convert("RGB"), 256), 224))
        pil_ref = F.normalize(pil_resized.float() / 255, list(vt.IMAGENET_MEAN), list(vt.IMAGENET_STD))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(out, transform(pixels))  # a PIL image and its pixels as a tensor: the same
    assert torch.equal(out, transform(Image.open(pet_photos[0])))  # deterministic
    _within_one_level_of_pillow(out, pil_ref)


def _within_one_level_of_pillow(ours: torch.Tensor, pillow: torch.Tensor) -> None:
    """Resizing as a tensor rounds a few pixels differently from Pillow: by one level of 255, rarely."""
    one_level = 1 / 255 / min(vt.IMAGENET_STD) + 1e-6
    difference = (ours - pillow).abs()
    assert difference.max() <= one_level
    assert (difference > 1e-6).float().mean() < 0.01


def test_transform_matches_torchvision_preset_for_vgg16() -> None:
    from torchvision.models import VGG16_Weights

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    ours = vt.imagenet_transform(weights=VGG16_Weights.IMAGENET1K_V1)(image)
    # torchvision's preset resizes PIL images with Pillow (its own tensor path differs more)
    _within_one_level_of_pillow(ours, VGG16_Weights.IMAGENET1K_V1.transforms()(image))


def test_train_transform_augments_randomly(pet_photos: list[Path]) -> None:
    transform = vt.imagenet_transform(train=True, size=64)
    assert not transform.deterministic
    with Image.open(pet_photos[1]) as image:
        torch.manual_seed(1)
        first = transform(image)
        torch.manual_seed(2)
        second = transform(image)
    assert first.shape == second.shape == (3, 64, 64)
    assert not torch.equal(first, second)


def _image(mode: str) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(np.random.default_rng(2).integers(0, 65536, (48, 64), dtype=np.uint16))
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_every_pil_mode_gives_three_channel_float(mode: str) -> None:
    out = vt.imagenet_transform(size=32)(_image(mode))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    array = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    rgb = vt.to_rgb(Image.fromarray(array))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (128, 128, 128)


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert vt.to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(buffer.getvalue())) as loaded:
        assert loaded.size == (40, 20)
        assert vt.to_rgb(loaded).size == (20, 40)


def test_to_rgb_does_not_modify_input() -> None:
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 40))
    before = image.tobytes()
    vt.to_rgb(image)
    assert image.mode == "RGBA" and image.tobytes() == before


def test_tensor_input_uint8_and_float_agree() -> None:
    uint8 = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    transform = vt.imagenet_transform(size=32)
    # uint8 resizing works in integer steps: within one 8-bit level (1 / 255 / std = 0.0175)
    assert torch.allclose(transform(uint8), transform(uint8.float() / 255), atol=0.0175)
    assert transform(uint8[:1]).shape == (3, 32, 32)
    assert transform(torch.cat([uint8, uint8[:1]])).shape == (3, 32, 32)


def test_size_keeps_256_to_224_ratio_unless_resize_given() -> None:
    assert vt.imagenet_transform(size=112).resize == 128
    assert vt.imagenet_transform(size=112, resize=112).resize == 112


def test_round_trip_settings_and_pickle() -> None:
    transform = vt.imagenet_transform(train=True, size=64)
    assert vt.ImageTransform.from_dict(transform.to_dict()) == transform
    clone = pickle.loads(pickle.dumps(transform))
    assert clone == transform
    image = torch.rand(3, 70, 70)
    torch.manual_seed(0)
    original_out = transform(image)
    torch.manual_seed(0)
    assert torch.equal(clone(image), original_out)  # same random crop from the same seed
    assert transform.to_dict() == {
        "train": True,
        "size": 64,
        "resize": 73,
        "mean": list(vt.IMAGENET_MEAN),
        "std": list(vt.IMAGENET_STD),
        "interpolation": "bilinear",
    }


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"size": 0}, ValueError, "imagenet_transform: expected size to be a positive int but got 0"),
        ({"size": 224, "resize": 200}, ValueError, "expected resize >= size"),
        (
            {"weights": "VGG16_Weights.NOPE"},
            ValueError,
            "expected weights to be a torchvision weights enum or its full name",
        ),
        ({"weights": 3}, TypeError, "expected weights to be a WeightsEnum member or its name but got int"),
    ],
)
def test_transform_argument_errors(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        vt.imagenet_transform(**kwargs)


def test_wrong_inputs_are_explained() -> None:
    transform = vt.imagenet_transform()
    with pytest.raises(
        TypeError,
        match="expected a PIL.Image.Image or a torch.Tensor but got str; open files with PIL.Image.open",
    ):
        transform("cat.jpg")
    with pytest.raises(
        ValueError, match=r"expected one image tensor of shape \[C, H, W\] but got shape \[2, 3, 8, 8\]"
    ):
        transform(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"1, 3 or 4 channels .* but got shape \[5, 8, 8\]"):
        transform(torch.zeros(5, 8, 8))


def test_unnormalize_inverts_transform(pet_photos: list[Path]) -> None:
    transform = vt.imagenet_transform(size=64, resize=64)
    with Image.open(pet_photos[2]) as image:
        expected = torch.from_numpy(np.array(vt.to_rgb(image).resize((64, 64)))).permute(2, 0, 1) / 255
        square = vt.to_rgb(image).resize((64, 64))
    restored = vt.unnormalize(transform(square))
    assert restored.min() >= 0 and restored.max() <= 1
    assert torch.allclose(restored, expected, atol=1e-5)
    batch = torch.stack([transform(square)] * 2)
    assert vt.unnormalize(batch).shape == (2, 3, 64, 64)
    with pytest.raises(
        ValueError,
        match=r"unnormalize: expected a tensor of shape \[3, H, W\] or \[B, 3, H, W\] but got \[64, 64\]",
    ):
        vt.unnormalize(torch.zeros(64, 64))


def test_real_photos_all_transform(pets_dir: Path) -> None:
    transform = vt.imagenet_transform(size=64)
    paths = sorted(pets_dir.glob("*/*.jpg"))
    assert len(paths) >= 300
    for path in paths[::10]:
        with Image.open(path) as image:
            assert transform(image).shape == (3, 64, 64)
