"""vggtransfer.data on generated photos (tests/photos.py), and on the real sample where it exists."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import photos
import vggtransfer as vt
from helpers import weights_equal
from photos import CAT, DOG
from vggtransfer.data import (
    DogsVsCats,
    ImageList,
    Split,
    check_image,
    oxford_pets,
    scan_images,
    stratified_split,
)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _warm(image: Image.Image) -> bool:
    """Whether a generated photo looks like a "cat" (warm) rather than a "dog" (cool)."""
    red, _, blue = _pixels(image.convert("RGB")).mean(axis=(0, 1))
    return bool(red > blue)


def test_scan_reports_exactly_the_bad_files_and_changes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    good, bad = photos.write_variants(folder, photos.photo(CAT, 0))
    photos.save(photos.photo(DOG, 0), folder / "plain.jpg")
    photos.save(photos.photo(DOG, 1), folder / "sub" / "nested.jpg")
    good |= {"plain.jpg", "nested.jpg"}
    (folder / ".hidden.jpg").write_bytes(b"")  # hidden files and folders are not scanned
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.jpg").write_bytes(b"")
    before = _digest(folder)
    loading_truncated = ImageFile.LOAD_TRUNCATED_IMAGES

    report = scan_images(folder, workers=2)

    assert {p.name for p in report.good} == good
    assert {b.path.name for b in report.bad} == set(bad)
    for item in report.bad:
        assert item.reason.startswith(bad[item.path.name]), (item.path.name, item.reason)
    assert report.good == sorted(report.good)
    assert [b.path for b in report.bad] == sorted(b.path for b in report.bad)
    assert _digest(folder) == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is loading_truncated
    assert str(report).startswith(f"{len(good)} good images, {len(bad)} bad files\n")
    assert all(f"  {b.path}: {b.reason}" in str(report).splitlines() for b in report.bad)


def test_scan_report_to_dict_is_json_and_names_every_bad_file(tmp_path: Path) -> None:
    photos.save(photos.photo(CAT, 0), tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"")
    (tmp_path / "c.jpg").write_text("not an image")
    # a list of paths, in any order, str or Path
    report = scan_images([tmp_path / "c.jpg", tmp_path / "a.jpg", str(tmp_path / "b.jpg")])
    assert json.loads(json.dumps(report.to_dict())) == {
        "good": 1,
        "bad": [
            {"path": str(tmp_path / "b.jpg"), "reason": "empty file (0 bytes)"},
            {"path": str(tmp_path / "c.jpg"), "reason": "not an image (Pillow cannot identify the format)"},
        ],
    }


def test_check_image_gives_the_scans_verdict_on_one_file(tmp_path: Path) -> None:
    good, bad = photos.write_variants(tmp_path, photos.photo(DOG, 2))
    report = scan_images(tmp_path)
    verdicts = {path.name: check_image(path) for path in tmp_path.iterdir()}
    assert verdicts == {p.name: None for p in report.good} | {b.path.name: b.reason for b in report.bad}
    assert {name for name, reason in verdicts.items() if reason is None} == good
    for name, reason in bad.items():
        assert str(verdicts[name]).startswith(reason), name
    assert check_image(str(tmp_path / "grey.jpg")) is None  # a str path works too
    # a lower limit refuses an ordinary photo as a bomb, naming its size and the limit
    width, height = photos.photo(DOG, 2).size
    assert check_image(tmp_path / "grey.jpg", max_pixels=width * height - 1) == (
        f"decompression bomb: {width}x{height} = {width * height} pixels, more than the limit of {width * height - 1}"
    )
    # the scan passes the limit on: every image of that size is refused, before it is decoded
    report = scan_images(tmp_path, max_pixels=width * height - 1)
    assert report.good == []
    refused = {b.path.name for b in report.bad if b.reason.startswith("decompression bomb")}
    assert refused == (good | set(bad)) - {"empty.jpg", "text.jpg", "Thumbs.db"}


def test_scan_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match="scan_images: folder '/no/such/folder' does not exist or is not a folder"
    ):
        scan_images("/no/such/folder")
    photos.save(photos.photo(CAT, 0), tmp_path / "a.jpg")
    with pytest.raises(
        FileNotFoundError, match="scan_images: folder '.*a.jpg' does not exist or is not a folder"
    ):
        scan_images(tmp_path / "a.jpg")


def test_scan_warns_when_truncated_images_cannot_be_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = photos.jpeg_bytes(photos.photo(CAT, 0))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while truncation is detected
        assert [b.path.name for b in scan_images(tmp_path).bad] == ["cut.jpg"]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.warns(UserWarning, match="LOAD_TRUNCATED_IMAGES is True in this process"):
        report = scan_images(tmp_path)
    assert [p.name for p in report.good] == ["cut.jpg"]  # what the warning is about: Pillow pads it


def test_kaggle_flat_layout_with_dirty_files(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    photos.kaggle_train(folder, 4)
    (folder / "cat.99.jpg").write_bytes(b"")
    (folder / "dog.98.jpg").write_text("oops")
    photos.save(photos.photo(DOG, 5), folder / "unlabelled.jpg")
    photos.save(photos.photo(CAT, 6), folder / "Cat.7.JPG")  # the prefix is matched case-blind

    data = DogsVsCats(folder, transform=vt.imagenet_transform(size=32))
    assert data.layout == "kaggle" and data.classes == ["cat", "dog"]
    assert len(data) == 9
    assert sorted((p.name, label) for p, label in data.samples) == sorted(
        [(f"cat.{i}.jpg", 0) for i in range(4)] + [("Cat.7.JPG", 0)] + [(f"dog.{i}.jpg", 1) for i in range(4)]
    )
    assert [(b.path.name, b.reason) for b in data.bad_files] == [
        ("cat.99.jpg", "empty file (0 bytes)"),
        ("dog.98.jpg", "not an image (Pillow cannot identify the format)"),
        ("unlabelled.jpg", "name has no cat. or dog. prefix, so it has no label in the Kaggle layout"),
    ]
    for i in range(len(data)):
        image, label = data[i]
        assert image.shape == (3, 32, 32) and label == data.targets[i]
    # each label belongs to its image: cats are the warm ones
    plain = data.with_transform(None)
    assert [_warm(plain[i][0]) for i in range(len(plain))] == [label == 0 for label in data.targets]


def test_petimages_layout_serves_every_good_file_once(tmp_path: Path) -> None:
    root = tmp_path / "PetImages"
    original = photos.photo(CAT, 1)
    assert original.width != original.height  # so that an orientation left undone shows in the size
    cat_good, cat_bad = photos.write_variants(root / "Cat", original)
    photos.write_photos(root / "Dog", DOG, ["0.jpg", "1.jpg", "2.jpg"])
    (root / "Dog" / "11702.jpg").write_bytes(b"")
    before = _digest(root)

    data = DogsVsCats(root)
    assert data.layout == "folders" and data.classes == ["cat", "dog"]
    assert len(data) == len(cat_good) + 3
    assert sorted(p.relative_to(root).as_posix() for p, _ in data.samples) == sorted(
        [f"Cat/{n}" for n in cat_good] + [f"Dog/{i}.jpg" for i in range(3)]
    )
    assert {b.path.relative_to(root).as_posix() for b in data.bad_files} == {f"Cat/{n}" for n in cat_bad} | {
        "Dog/11702.jpg"
    }
    served = [data[i] for i in range(len(data))]
    assert all(image.mode == "RGB" for image, _ in served)
    assert [label for _, label in served] == [0 if p.parent.name == "Cat" else 1 for p, _ in data.samples]
    # no substitution: each item is the file at that position
    for (image, _), (path, _) in zip(served, data.samples, strict=True):
        with Image.open(path) as stored:
            assert np.array_equal(_pixels(image), _pixels(vt.to_rgb(stored))), path
    # EXIF orientation undone: the rotated file is served the right way up
    rotated = served[[p.name for p, _ in data.samples].index("rotated.jpg")][0]
    assert rotated.size == original.size
    assert np.abs(_pixels(rotated) - _pixels(original)).mean() < 8  # JPEG's loss, not a turned image
    assert _digest(root) == before


def test_class_folders_of_any_names(tmp_path: Path) -> None:
    root = tmp_path / "sample"
    folders = photos.sample_like(root, {"dogs": 4, "birds": 2, "cats": 3})
    photos.save(photos.photo(CAT, 9), root / "beside-the-folders.jpg")  # not in a class folder: ignored
    before = _digest(root)

    data = DogsVsCats(root, transform=vt.imagenet_transform(size=32))
    assert data.layout == "folders" and data.classes == ["birds", "cats", "dogs"]  # sorted folder names
    assert data.bad_files == []  # NOTICE.md and the CSV beside the folders are not scanned
    assert sorted((p, data.classes[label]) for p, label in data.samples) == sorted(
        (p, name) for name, paths in folders.items() for p in paths
    )
    assert data[0][0].shape == (3, 32, 32)
    assert _digest(root) == before


def test_unlabelled_folder_yields_ids(tmp_path: Path) -> None:
    folder = tmp_path / "test1"
    photos.kaggle_test(folder, [DOG, CAT, DOG])
    (folder / "4.jpg").write_bytes(b"")
    data = DogsVsCats(folder, transform=vt.imagenet_transform(size=32))
    assert data.layout == "unlabelled" and not data.labelled and data.classes == []
    assert data.ids == ["1", "2", "3"] and data.targets == [-1, -1, -1]
    for i, ident in enumerate(data.ids):
        image, item_id = data[i]
        assert item_id == ident == data.samples[i][0].stem and image.shape == (3, 32, 32)
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


def test_file_broken_after_scan_is_named_not_substituted(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    photos.kaggle_train(folder, 2)
    data = DogsVsCats(folder)
    (folder / "cat.1.jpg").write_bytes(b"")
    assert data[0][1] == 0  # the others still load
    with pytest.raises(
        RuntimeError, match="image '.*cat.1.jpg' could not be read although it passed the scan"
    ):
        data[1]


def _val_counts(split: Split, labels: list[int]) -> dict[int, int]:
    return {label: [labels[i] for i in split.val].count(label) for label in sorted(set(labels))}


def test_stratified_split_is_stratified_disjoint_complete_and_seeded(tmp_path: Path) -> None:
    photos.class_folders(tmp_path / "pets", {"cats": 6, "dogs": 10})
    data = DogsVsCats(tmp_path / "pets")
    split = stratified_split(data, 0.25, seed=3)
    assert set(split.train).isdisjoint(split.val)
    assert sorted(split.train + split.val) == list(range(len(data)))
    # each class's share, rounded half up: 6 * 0.25 = 1.5 -> 2 and 10 * 0.25 = 2.5 -> 3
    assert _val_counts(split, data.targets) == {0: 2, 1: 3}
    assert (split.seed, split.val_fraction) == (3, 0.25)
    # the seed alone decides which samples are held out
    assert stratified_split(data, 0.25, seed=3) == split
    assert stratified_split(data.targets, 0.25, seed=3).val == split.val
    assert len({stratified_split(data, 0.25, seed=seed).val for seed in range(10)}) > 5
    # small classes: one sample is never held out, both sides keep one of a larger class
    labels = [0] + [1] * 2 + [2] * 9 + [3] * 5
    assert _val_counts(stratified_split(labels, 0.1), labels) == {0: 0, 1: 1, 2: 1, 3: 1}
    assert _val_counts(stratified_split(labels, 0.9), labels) == {0: 0, 1: 1, 2: 8, 3: 4}
    with pytest.raises(ValueError, match=r"expected val_fraction in \(0, 1\) but got 1.5"):
        stratified_split(data, 1.5)
    with pytest.raises(ValueError, match=r"expected val_fraction in \(0, 1\) but got 0"):
        stratified_split(data, 0)


def test_split_round_trips_through_json_and_checks_its_files(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    photos.class_folders(root, {"cats": 3, "dogs": 5})
    data = DogsVsCats(root)
    split = stratified_split(data, 0.4, seed=1)
    assert split.files == tuple(str(p) for p, _ in data.samples)
    assert Split.from_dict(json.loads(json.dumps(split.to_dict()))) == split
    # subsets: the given positions, validation from its own dataset (no augmentation there)
    train, val = split.subsets(data.with_transform(vt.imagenet_transform(size=32)), data.with_transform(None))
    assert (train.indices, val.indices) == (list(split.train), list(split.val))
    assert train[0][0].shape == (3, 32, 32) and isinstance(val[0][0], Image.Image)
    assert [val[i][1] for i in range(len(val))] == [data.targets[i] for i in split.val]
    # the same folder scanned again passes the check; a changed folder does not
    split.check(DogsVsCats(root))
    os.remove(root / "dogs" / "dogs-4.jpg")
    with pytest.raises(ValueError, match=r"the dataset's files differ .* \(7 files now, 8 then\)"):
        split.check(DogsVsCats(root))
    photos.save(photos.photo(DOG, 99), root / "dogs" / "dogs-9.jpg")
    with pytest.raises(ValueError, match="the dataset's files differ from the ones this split was made for"):
        split.check(DogsVsCats(root))  # as many files as before, but not the same ones
    with pytest.raises(ValueError, match="the dataset's files differ"):
        split.check(ImageList(list(reversed(data.samples)), data.classes))  # same files, other order


def _resnet18() -> torch.nn.Module:
    # the cheapest model to build; Split does not care which
    return vt.replace_classifier(vt.freeze_features(vt.create_model("resnet18", weights=None)), 2)


def test_split_can_be_saved_with_a_checkpoint(tmp_path: Path) -> None:
    photos.class_folders(tmp_path / "pets", {"cats": 4, "dogs": 4})
    data = DogsVsCats(tmp_path / "pets", transform=vt.imagenet_transform(size=32))
    split = stratified_split(data, 0.5, seed=0)
    train, _ = split.subsets(data)
    trainer = vt.Trainer(_resnet18(), device="cpu", progress=False, seed=0)
    trainer.extra["split"] = split.to_dict()
    trainer.fit(train, epochs=1, batch_size=2, num_workers=0)
    assert trainer.class_names == ["cats", "dogs"]  # found through the Subset
    path = trainer.save_checkpoint(tmp_path / "ck.pt")
    fresh = vt.Trainer(_resnet18(), device="cpu", progress=False)
    assert not weights_equal(fresh.model, trainer.model)
    fresh.load_checkpoint(path)
    restored = Split.from_dict(fresh.extra["split"])
    assert restored == split
    restored.check(DogsVsCats(tmp_path / "pets"))
    assert weights_equal(fresh.model, trainer.model)


def test_oxford_pets_through_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.oxford_iiit_pet as oxford

    def no_download(*args, **kwargs):
        raise AssertionError("oxford_pets downloaded although the data was there")

    monkeypatch.setattr(oxford, "download_and_extract_archive", no_download)
    listed = photos.oxford_layout(tmp_path)
    images = tmp_path / "oxford-iiit-pet" / "images"
    (images / f"{listed['trainval'][0][0]}.jpg").write_bytes(b"")  # one broken file
    os.remove(images / f"{listed['trainval'][-1][0]}.jpg")  # one listed file missing

    data = oxford_pets(tmp_path, download=True, transform=vt.imagenet_transform(size=32))
    assert data.classes == ["cat", "dog"]
    # labels from the species column, whatever the breed's class id
    assert [(p.stem, label) for p, label in data.samples] == listed["trainval"][1:-1]
    assert [(b.path.stem, b.reason) for b in data.bad_files] == sorted(
        [
            (listed["trainval"][0][0], "empty file (0 bytes)"),
            (listed["trainval"][-1][0], "listed in the annotations but missing"),
        ]
    )
    for i in range(len(data)):  # PNG and RGBA data named .jpg included
        assert data[i][0].shape == (3, 32, 32)
    plain = data.with_transform(None)
    assert [_warm(plain[i][0]) for i in range(len(plain))] == [label == 0 for label in plain.targets]

    test = oxford_pets(tmp_path, split="test", download=False)
    assert [(p.stem, label) for p, label in test.samples] == listed["test"] and test.bad_files == []


def test_oxford_pets_missing_offline(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="Dataset not found"):
        oxford_pets(tmp_path, download=False)


def _pillow_decodes(path: Path) -> bool:
    """An independent check: Pillow decodes the whole file at full size and converts it to RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            image.convert("RGB")
    except Exception:
        return False
    return True


@pytest.mark.real_photos
def test_real_sample_scans_like_an_independent_decode(pets_dir: Path) -> None:
    """The whole real sample: DogsVsCats keeps exactly the files Pillow decodes, labelled by folder."""
    before = _digest(pets_dir)
    data = DogsVsCats(pets_dir, transform=vt.imagenet_transform(size=32))

    folders = sorted(p.name for p in pets_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {
        path: folder
        for folder in folders
        for path in (pets_dir / folder).rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(pets_dir).parts)
    }
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        usable = {path for path, ok in zip(files, pool.map(_pillow_decodes, files), strict=True) if ok}
    assert len(folders) >= 2 and len(usable) > 0
    assert data.classes == folders
    assert {p: data.classes[label] for p, label in data.samples} == {p: files[p] for p in usable}
    assert {b.path for b in data.bad_files} == set(files) - usable
    for i in range(0, len(data), max(1, len(data) // 20)):
        assert data[i][0].shape == (3, 32, 32)
    assert _digest(pets_dir) == before  # read, never written


# ---------------------------------------------------------------------------- hostile folders


def test_a_class_folder_linking_back_to_the_data_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    photos.class_folders(root, {"cats": 2, "dogs": 2})
    (root / "loop").symlink_to(root, target_is_directory=True)
    before = _digest(root / "cats") | _digest(root / "dogs")
    with pytest.raises(ValueError) as raised:
        DogsVsCats(root, progress=False)
    assert str(raised.value) == (
        f"DogsVsCats: 'loop' in {str(root)!r} is a symbolic link to {str(root.resolve())!r}, which contains "
        f"the data folder itself; as a class it would repeat every image. Remove the link"
    )
    assert _digest(root / "cats") | _digest(root / "dogs") == before
    (root / "loop").unlink()
    (root / "elsewhere").symlink_to(root / "dogs", target_is_directory=True)  # an ordinary linked folder
    assert DogsVsCats(root, progress=False).classes == ["cats", "dogs", "elsewhere"]


def test_an_unreadable_sub_folder_is_an_error_not_missing_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "pets"
    photos.class_folders(root, {"cats": 2, "dogs": 2})
    (root / "dogs" / "more").mkdir()
    photos.save(photos.photo(DOG, 7), root / "dogs" / "more" / "x.jpg")
    locked = root / "dogs" / "more"
    real_scandir = os.scandir

    def scandir(path=None):  # what listing a chmod 000 folder does (root would ignore the mode)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError) as raised:
        DogsVsCats(root, progress=False)
    assert str(raised.value) == (
        f"[Errno 13] cannot list folder {str(locked)!r} (Permission denied); its images would be left out. "
        f"Make it readable (chmod +rx) or move it out of the data folder"
    )
    with pytest.raises(PermissionError, match="cannot list folder"):
        scan_images(root, progress=False)


def test_non_utf8_file_names_are_scanned_and_served(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    photos.class_folders(root, {"cats": 2, "dogs": 2})
    odd = Path(os.fsdecode(bytes(root / "cats") + b"/\xff\xfe.jpg"))
    photos.save(photos.photo(CAT, 9), odd)
    data = DogsVsCats(root, transform=vt.imagenet_transform(size=32), progress=False)
    assert odd in [path for path, _ in data.samples] and len(data) == 5
    assert data[[path for path, _ in data.samples].index(odd)][0].shape == (3, 32, 32)


def test_predict_names_a_decompression_bomb(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (15000, 15000)).save(bomb)
    model = vt.replace_classifier(vt.freeze_features(vt.create_model("resnet18", weights=None)), 2)
    trainer = vt.Trainer(model, device="cpu", progress=False, transform=vt.imagenet_transform(size=32))
    with pytest.raises(
        ValueError, match=rf"^predict: refusing '{bomb}': Image size \(225000000 pixels\) exceeds limit"
    ):
        trainer.predict(bomb)
