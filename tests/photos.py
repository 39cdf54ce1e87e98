"""Generated stand-ins for real photos, and the folder layouts the data layer reads.

Every image is made from a seed, so a test gets the same bytes on every run and machine
(Pillow's encoders are deterministic). The classes differ in colour and texture, the way
tests/helpers.py's ``blobs`` do for tensors, so a frozen, randomly initialised VGG or ResNet
can learn them at 32 px: class 0 ("cat") is warm with horizontal stripes, class 1 ("dog") cool
with a chequerboard, 2 green with diagonal stripes, 3 grey with spots. Images are 64 to 160 px
and never square, with a brightness gradient and a dark blob placed at random, so a rotation or
a flip changes them.

Nothing here needs the real photo sample; tests/conftest.py's ``pets_dir`` is for that.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CAT, DOG = 0, 1

_COLOURS = ((205, 115, 55), (55, 105, 205), (60, 170, 70), (128, 128, 128))


def photo(label: int, seed: int = 0, size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB "photo" of class ``label`` (0 to 3), the same for the same label and seed.

    ``size`` is (width, height); by default 64 to 160 px, never square, landscape or portrait.
    """
    rng = np.random.default_rng([label, seed])
    if size is None:
        long = int(rng.integers(96, 161))
        short = int(rng.integers(64, long - 15))
        size = (long, short) if rng.random() < 0.7 else (short, long)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    period = rng.uniform(6, 14)
    phase = rng.random()
    texture = {
        0: np.sin(2 * np.pi * (yy / period + phase)),
        1: np.sign(np.sin(2 * np.pi * (xx / period + phase)) * np.sin(2 * np.pi * (yy / period + phase))),
        2: np.sin(2 * np.pi * ((xx + yy) / period + phase)),
        3: (np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period) > 0.5) * 2.0 - 1,
    }[label]
    colour = np.array(_COLOURS[label], dtype=np.float32) + rng.normal(0, 12, 3)
    pixels = colour + 40 * texture[..., None] * np.array([1.0, 0.85, 0.7])
    pixels += 40 * (xx / width - 0.5)[..., None]  # brighter to the right
    cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
    radius = rng.uniform(0.1, 0.25) * min(width, height)
    pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] *= 0.35
    pixels += rng.normal(0, 10, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def save(image: Image.Image, path: Path, format: str = "JPEG", **options: Any) -> Path:
    """Write ``image`` to ``path`` (parents created) in ``format``, whatever the suffix says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=format, **options)
    return path


def jpeg_bytes(image: Image.Image, **options: Any) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", **options)
    return encoded.getvalue()


def exif_rotated(rgb: Image.Image, path: Path) -> Path:
    """``rgb`` stored turned on its side, with EXIF orientation 6 saying how to turn it back."""
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return save(rgb.transpose(Image.Transpose.ROTATE_90), path, exif=exif.tobytes())


_BOMB: list[bytes] = []


def bomb_bytes() -> bytes:
    """A 15000 x 15000 PNG (225 megapixels, over Pillow's limit) of a few kilobytes, made once."""
    if not _BOMB:
        encoded = io.BytesIO()
        Image.new("1", (15000, 15000)).save(encoded, format="PNG")
        _BOMB.append(encoded.getvalue())
    return _BOMB[0]


def write_variants(folder: Path, rgb: Image.Image, prefix: str = "") -> tuple[set[str], dict[str, str]]:
    """Odd-but-valid and broken files made from ``rgb``: (good names, bad name -> reason's start).

    Good: CMYK, greyscale and EXIF-rotated JPEGs; palette and RGBA PNGs, and a GIF, all named
    .jpg; a 16-bit greyscale PNG. Bad: an empty file, cut-off baseline, progressive and CMYK
    JPEGs, text named .jpg, a Thumbs.db and a decompression bomb.
    """
    folder.mkdir(parents=True, exist_ok=True)
    good = {
        "cmyk.jpg": lambda p: save(rgb.convert("CMYK"), p),
        "palette-png.jpg": lambda p: save(rgb.quantize(32), p, format="PNG"),
        "rgba-png.jpg": lambda p: save(rgb.convert("RGBA"), p, format="PNG"),
        "grey.jpg": lambda p: save(rgb.convert("L"), p),
        "sixteen.png": lambda p: save(
            Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), p, format="PNG"
        ),
        "gif.jpg": lambda p: save(rgb, p, format="GIF"),
        "rotated.jpg": lambda p: exif_rotated(rgb, p),
    }
    for name, write in good.items():
        write(folder / f"{prefix}{name}")
    (folder / f"{prefix}empty.jpg").write_bytes(b"")
    # the scan decodes JPEGs at reduced scale: cut-off progressive and CMYK ones must still fail it
    for name, image, options in (
        ("truncated.jpg", rgb, {}),
        ("truncated-progressive.jpg", rgb, {"progressive": True}),
        ("truncated-cmyk.jpg", rgb.convert("CMYK"), {}),
    ):
        data = jpeg_bytes(image, **options)
        (folder / f"{prefix}{name}").write_bytes(data[: len(data) * 2 // 3])
    (folder / f"{prefix}text.jpg").write_text("this is not an image\n")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))
    (folder / f"{prefix}bomb.png").write_bytes(bomb_bytes())
    bad = {
        f"{prefix}empty.jpg": "empty file (0 bytes)",
        f"{prefix}truncated.jpg": "truncated image data",
        f"{prefix}truncated-progressive.jpg": "truncated image data",
        f"{prefix}truncated-cmyk.jpg": "truncated image data",
        f"{prefix}text.jpg": "not an image (Pillow cannot identify the format)",
        "Thumbs.db": "not an image (Pillow cannot identify the format)",
        f"{prefix}bomb.png": "decompression bomb",
    }
    return {f"{prefix}{name}" for name in good}, bad


def write_photos(folder: Path, label: int, names: Sequence[str], *, seed: int = 0) -> list[Path]:
    """One generated JPEG of class ``label`` per name in ``folder``; seeds ``seed``, ``seed + 1``, ..."""
    return [save(photo(label, seed + i), folder / name) for i, name in enumerate(names)]


def class_folders(root: Path, counts: dict[str, int], *, seed: int = 0) -> dict[str, list[Path]]:
    """``root/<class>/<class>-<i>.jpg`` for each class in ``counts``; the n-th class looks like label n."""
    return {
        name: write_photos(root / name, label, [f"{name}-{i}.jpg" for i in range(count)], seed=seed)
        for label, (name, count) in enumerate(counts.items())
    }


def kaggle_train(folder: Path, per_class: int, *, seed: int = 0) -> list[Path]:
    """Kaggle's flat ``train/``: ``cat.<i>.jpg`` and ``dog.<i>.jpg``."""
    return write_photos(folder, CAT, [f"cat.{i}.jpg" for i in range(per_class)], seed=seed) + write_photos(
        folder, DOG, [f"dog.{i}.jpg" for i in range(per_class)], seed=seed
    )


def kaggle_test(folder: Path, labels: Sequence[int], *, seed: int = 1000) -> dict[str, int]:
    """Kaggle's unlabelled ``test1/``: ``1.jpg``, ``2.jpg``, ... of the given classes; id -> label."""
    for i, label in enumerate(labels, 1):
        save(photo(label, seed + i), folder / f"{i}.jpg")
    return {str(i): label for i, label in enumerate(labels, 1)}


def petimages(root: Path, per_class: int, *, seed: int = 0) -> dict[str, list[Path]]:
    """Microsoft's PetImages archive: ``Cat/<i>.jpg`` and ``Dog/<i>.jpg``."""
    names = [f"{i}.jpg" for i in range(per_class)]
    return {
        "Cat": write_photos(root / "Cat", CAT, names, seed=seed),
        "Dog": write_photos(root / "Dog", DOG, names, seed=seed),
    }


# A few of Oxford-IIIT Pet's 37 breeds (cat breeds are capitalised there), with their class ids.
OXFORD_BREEDS = {CAT: (("Abyssinian", 1), ("Bengal", 6)), DOG: (("beagle", 11), ("boxer", 13))}


def oxford_layout(
    root: Path, per_breed: int = 2, *, test_per_breed: int = 1
) -> dict[str, list[tuple[str, int]]]:
    """The folders torchvision's ``OxfordIIITPet`` reads, under ``root/oxford-iiit-pet``.

    ``images/<Breed>_<n>.jpg`` and ``annotations/list.txt``, ``trainval.txt`` and ``test.txt``
    (lines ``name class-id species breed-id``, species 1 = cat, 2 = dog). As in the real
    download, one image of each split is PNG data and one RGBA PNG data, named .jpg.

    Returns, per split, the (image name, 0 for cat or 1 for dog) pairs in listing order.
    """
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    listed: dict[str, list[tuple[str, int]]] = {"trainval": [], "test": []}
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    seed = 0
    for species in (CAT, DOG):
        for breed_id, (breed, class_id) in enumerate(OXFORD_BREEDS[species], 1):
            for n in range(1, per_breed + test_per_breed + 1):
                split = "trainval" if n <= per_breed else "test"
                name = f"{breed}_{n}"
                image = photo(species, seed)
                seed += 1
                path = base / "images" / f"{name}.jpg"
                if len(listed[split]) == 1:
                    save(image, path, format="PNG")
                elif len(listed[split]) == 2:
                    save(image.convert("RGBA"), path, format="PNG")
                else:
                    save(image, path)
                listed[split].append((name, species))
                lines[split].append(f"{name} {class_id} {species + 1} {breed_id}")
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
    (base / "annotations" / "list.txt").write_text(
        header + "".join(line + "\n" for line in lines["trainval"] + lines["test"])
    )
    for split in ("trainval", "test"):
        (base / "annotations" / f"{split}.txt").write_text("".join(line + "\n" for line in lines[split]))
    return listed


def sample_like(root: Path, counts: dict[str, int], *, seed: int = 0) -> dict[str, list[Path]]:
    """A folder laid out like the real photo sample: class folders, with a CSV and a notice beside them."""
    folders = class_folders(root, counts, seed=seed)
    with (root / "classification.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_name", "species"])
        writer.writerows((p.stem, name) for name, paths in folders.items() for p in paths)
    (root / "NOTICE.md").write_text("# Generated photos\n\nMade by tests/photos.py.\n")
    return folders
