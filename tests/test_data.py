from __future__ import annotations

import csv
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import vggtransfer as vt
from vggtransfer.data import BadFile, DogsVsCats, ImageList, Split, oxford_pets, scan_images, stratified_split


def _photo(pets_dir: Path, kind: str, i: int) -> Path:
    return sorted((pets_dir / kind).glob("*.jpg"))[i]


def _write_variants(folder: Path, source: Path, prefix: str = "") -> tuple[set[str], dict[str, str]]:
    """Odd-but-valid and broken files made from one real photo: (good names, bad name -> reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        rgb = image.convert("RGB")
    good = {
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, format="JPEG"),
        "palette-png.jpg": lambda p: rgb.quantize(32).save(p, format="PNG"),
        "rgba-png.jpg": lambda p: rgb.convert("RGBA").save(p, format="PNG"),
        "grey.jpg": lambda p: rgb.convert("L").save(p, format="JPEG"),
        "sixteen.png": lambda p: Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(
            p
        ),
        "gif.jpg": lambda p: rgb.save(p, format="GIF"),
        "rotated.jpg": lambda p: _exif_rotated(rgb, p),
    }
    for name, write in good.items():
        write(folder / f"{prefix}{name}")
    source_bytes = source.read_bytes()
    (folder / f"{prefix}empty.jpg").write_bytes(b"")
    (folder / f"{prefix}truncated.jpg").write_bytes(source_bytes[: len(source_bytes) // 2])
    # the scan decodes JPEGs at reduced scale: cut-off progressive and CMYK ones must still fail it
    for name, options in (("progressive", {"progressive": True}), ("cmyk", {})):
        encoded = io.BytesIO()
        (rgb.convert("CMYK") if name == "cmyk" else rgb).save(encoded, format="JPEG", **options)
        (folder / f"{prefix}truncated-{name}.jpg").write_bytes(encoded.getvalue()[: encoded.tell() * 2 // 3])
    (folder / f"{prefix}text.jpg").write_text("this is not an image\n")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))
    Image.new("1", (15000, 15000)).save(folder / f"{prefix}bomb.png")
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


def _exif_rotated(rgb: Image.Image, path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.transpose(Image.Transpose.ROTATE_90).save(path, format="JPEG", exif=exif.tobytes())


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_scan_reports_exactly_the_bad_files_and_changes_nothing(pets_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    good, bad = _write_variants(folder, _photo(pets_dir, "cats", 0))
    shutil.copy(_photo(pets_dir, "dogs", 0), folder / "plain.jpg")
    good.add("plain.jpg")
    before = _digest(folder)
    loading_truncated = ImageFile.LOAD_TRUNCATED_IMAGES

    report = scan_images(folder, workers=2)

    assert {p.name for p in report.good} == good
    assert {b.path.name for b in report.bad} == set(bad)
    for item in report.bad:
        assert item.reason.startswith(bad[item.path.name]), (item.path.name, item.reason)
    assert _digest(folder) == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is loading_truncated
    assert str(report).startswith(f"{len(good)} good images, {len(bad)} bad files\n")


def test_scan_missing_folder() -> None:
    with pytest.raises(
        FileNotFoundError, match="scan_images: folder '/no/such/folder' does not exist or is not a folder"
    ):
        scan_images("/no/such/folder")


def test_scan_warns_when_truncated_images_cannot_be_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.warns(UserWarning, match="LOAD_TRUNCATED_IMAGES is True in this process"):
        scan_images(tmp_path)


def test_kaggle_flat_layout_with_dirty_files(pets_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(4):
        shutil.copy(_photo(pets_dir, "cats", i), folder / f"cat.{i}.jpg")
        shutil.copy(_photo(pets_dir, "dogs", i), folder / f"dog.{i}.jpg")
    (folder / "cat.99.jpg").write_bytes(b"")
    (folder / "dog.98.jpg").write_text("oops")
    shutil.copy(_photo(pets_dir, "dogs", 5), folder / "unlabelled.jpg")

    data = DogsVsCats(folder, transform=vt.imagenet_transform(size=32))
    assert data.layout == "kaggle" and data.classes == ["cat", "dog"]
    assert len(data) == 8
    assert sorted((p.name, label) for p, label in data.samples) == sorted(
        [(f"cat.{i}.jpg", 0) for i in range(4)] + [(f"dog.{i}.jpg", 1) for i in range(4)]
    )
    assert [(b.path.name, b.reason) for b in data.bad_files] == [
        ("cat.99.jpg", "empty file (0 bytes)"),
        ("dog.98.jpg", "not an image (Pillow cannot identify the format)"),
        ("unlabelled.jpg", "name has no cat. or dog. prefix, so it has no label in the Kaggle layout"),
    ]
    image, label = data[0]
    assert image.shape == (3, 32, 32) and label in (0, 1)


def test_petimages_layout_serves_every_good_file_once(pets_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "PetImages"
    cat_good, cat_bad = _write_variants(root / "Cat", _photo(pets_dir, "cats", 1))
    (root / "Dog").mkdir()
    for i in range(3):
        shutil.copy(_photo(pets_dir, "dogs", i), root / "Dog" / f"{i}.jpg")
    (root / "Dog" / "11702.jpg").write_bytes(b"")
    before = _digest(root)

    data = DogsVsCats(root)
    assert data.layout == "folders" and data.classes == ["cat", "dog"]
    assert len(data) == len(cat_good) + 3
    assert {b.path.relative_to(root).as_posix() for b in data.bad_files} == {f"Cat/{n}" for n in cat_bad} | {
        "Dog/11702.jpg"
    }
    served = [data[i] for i in range(len(data))]
    assert all(image.mode == "RGB" for image, _ in served)
    assert sorted(label for _, label in served) == [0] * len(cat_good) + [1] * 3
    # no substitution: each item is the file at that position
    assert [p.name for p, _ in data.samples].count("rotated.jpg") == 1
    rotated = data.samples.index(next(s for s in data.samples if s[0].name == "rotated.jpg"))
    with Image.open(_photo(pets_dir, "cats", 1)) as original:
        assert served[rotated][0].size == original.size  # EXIF orientation undone
    assert _digest(root) == before


def test_class_folders_of_any_names_read_only_sample(pets_dir: Path) -> None:
    data = DogsVsCats(pets_dir, transform=vt.imagenet_transform(size=32))
    assert data.classes == ["cats", "dogs"]
    assert len(data) == 370 and data.bad_files == []  # NOTICE.md and the CSV beside the folders are ignored
    assert data.targets.count(0) == 120 and data.targets.count(1) == 250


def test_unlabelled_folder_yields_ids(pets_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "test1"
    folder.mkdir()
    for i in range(1, 4):
        shutil.copy(_photo(pets_dir, "dogs", i), folder / f"{i}.jpg")
    (folder / "4.jpg").write_bytes(b"")
    data = DogsVsCats(folder, transform=vt.imagenet_transform(size=32))
    assert data.layout == "unlabelled" and not data.labelled and data.classes == []
    assert data.ids == ["1", "2", "3"]
    assert data[2][1] == "3"
    assert [b.path.name for b in data.bad_files] == ["4.jpg"]


def test_layout_errors(tmp_path: Path) -> None:
    (tmp_path / "kaggle" / "train").mkdir(parents=True)
    (tmp_path / "kaggle" / "test1").mkdir()
    with pytest.raises(
        ValueError,
        match="looks like the extracted Kaggle archive .* pass '.*kaggle/train' for the labelled images",
    ):
        DogsVsCats(tmp_path / "kaggle")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"DogsVsCats: no usable image in '.*empty' \(1 bad files\)"):
        DogsVsCats(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="DogsVsCats: folder '.*nope' does not exist"):
        DogsVsCats(tmp_path / "nope")


def test_file_broken_after_scan_is_named_not_substituted(pets_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(2):
        shutil.copy(_photo(pets_dir, "cats", i), folder / f"cat.{i}.jpg")
    data = DogsVsCats(folder)
    (folder / "cat.1.jpg").write_bytes(b"")
    with pytest.raises(
        RuntimeError, match="image '.*cat.1.jpg' could not be read although it passed the scan"
    ):
        data[1]


def test_stratified_split_is_seeded_stratified_and_saveable(pets_dir: Path) -> None:
    data = DogsVsCats(pets_dir)
    split = stratified_split(data, 0.2, seed=3)
    assert split == stratified_split(data, 0.2, seed=3)
    assert split != stratified_split(data, 0.2, seed=4)
    assert set(split.train).isdisjoint(split.val) and len(split.train) + len(split.val) == len(data)
    val_labels = [data.targets[i] for i in split.val]
    assert (val_labels.count(0), val_labels.count(1)) == (24, 50)
    assert Split.from_dict(split.to_dict()) == split
    split.check(data)
    train, val = split.subsets(data)
    assert len(train) == 296 and len(val) == 74
    other = ImageList(data.samples[:-1], data.classes)
    with pytest.raises(ValueError, match="the dataset's files differ from the ones this split was made for"):
        split.check(other)
    with pytest.raises(ValueError, match="expected val_fraction in \\(0, 1\\) but got 1.5"):
        stratified_split(data, 1.5)


def test_split_can_be_saved_with_a_checkpoint(pets_dir: Path, tmp_path: Path) -> None:
    data = DogsVsCats(pets_dir, transform=vt.imagenet_transform(size=32))
    split = stratified_split(data, 0.5, seed=0)
    train, _ = split.subsets(data)
    model = vt.replace_classifier(vt.freeze_features(vt.create_model("vgg11", weights=None)), 2)
    trainer = vt.Trainer(model, device="cpu", progress=False, seed=0)
    trainer.extra["split"] = split.to_dict()
    trainer.fit(torch.utils.data.Subset(train, range(8)), epochs=1, batch_size=4, num_workers=0)
    assert trainer.class_names == ["cats", "dogs"]  # found through the Subsets
    path = trainer.save_checkpoint(tmp_path / "ck.pt")
    fresh = vt.Trainer(
        vt.replace_classifier(vt.freeze_features(vt.create_model("vgg11", weights=None)), 2),
        device="cpu",
        progress=False,
    )
    fresh.load_checkpoint(path)
    assert Split.from_dict(fresh.extra["split"]) == split


def _oxford_layout(pets_dir: Path, root: Path, per_species: int = 3) -> list[tuple[str, int]]:
    """The folder structure torchvision's OxfordIIITPet expects, from the shared photos."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    rows = list(csv.DictReader((pets_dir / "classification.csv").open()))
    chosen = [r for r in rows if r["species"] == "cat"][:per_species] + [
        r for r in rows if r["species"] == "dog"
    ][:per_species]
    lines = []
    for row in chosen:
        folder = "cats" if row["species"] == "cat" else "dogs"
        shutil.copy(
            pets_dir / folder / f"{row['image_name']}.jpg", base / "images" / f"{row['image_name']}.jpg"
        )
        lines.append(f"{row['image_name']} {row['class_id']} {1 if row['species'] == 'cat' else 2} 1")
    (base / "annotations" / "trainval.txt").write_text("\n".join(lines) + "\n")
    (base / "annotations" / "test.txt").write_text("")
    return [(r["image_name"], 0 if r["species"] == "cat" else 1) for r in chosen]


def test_oxford_pets_through_torchvision_layout(pets_dir: Path, tmp_path: Path) -> None:
    expected = _oxford_layout(pets_dir, tmp_path)
    (tmp_path / "oxford-iiit-pet" / "images" / f"{expected[0][0]}.jpg").write_bytes(b"")  # one broken file
    data = oxford_pets(tmp_path, download=True, transform=vt.imagenet_transform(size=32))
    assert data.classes == ["cat", "dog"]
    assert [(p.stem, label) for p, label in data.samples] == expected[1:]
    assert [(b.path.stem, b.reason) for b in data.bad_files] == [(expected[0][0], "empty file (0 bytes)")]
    assert data[0][0].shape == (3, 32, 32)


def test_oxford_pets_missing_offline(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="Dataset not found"):
        oxford_pets(tmp_path, download=False)


def test_bad_file_is_a_named_tuple() -> None:
    bad = BadFile(Path("x.jpg"), "empty file (0 bytes)")
    assert bad.path == Path("x.jpg") and bad == (Path("x.jpg"), "empty file (0 bytes)")
    assert io.StringIO(str(bad)).read().startswith("BadFile(")
