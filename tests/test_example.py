"""examples/dogs_vs_cats.py end to end, offline, on generated photos (and the real sample where it exists).

The generated classes are learnable (tests/photos.py), so these tests also check that the script
learns: a mix-up of images and labels anywhere on the way shows as lost accuracy.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import urllib.error
from pathlib import Path

import pytest
import torch

import photos
from photos import CAT, DOG
from vggtransfer.data import Split

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dogs_vs_cats.py"
OPTIONS = ["--weights", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0"]
OPTIONS += ["--device", "cpu", "--val-fraction", "0.25"]
# The smallest run that still exercises every step: ResNet-18 is the cheapest model to build.
SMALL = [*OPTIONS, "--arch", "resnet18", "--epochs", "2"]
# The recipe's family (VGG, classifier replaced), trained long enough to learn the generated
# classes: the features are cached, so epochs after the first cost little.
VGG = [*OPTIONS, "--arch", "vgg11", "--epochs", "5"]
OUTPUTS = ["checkpoint.pt", "curves.png", "metrics.json", "submission.csv"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("dogs_vs_cats_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kaggle(root: Path, n: int = 10) -> tuple[Path, Path, dict[str, int]]:
    """Kaggle's train/ (n cats, n dogs, 3 broken files) and test1/; returns them and test1's labels."""
    train, test = root / "train", root / "test1"
    photos.kaggle_train(train, n)
    # a few percent of broken files, as in the real archives
    (train / "cat.666.jpg").write_bytes(b"")
    data = photos.jpeg_bytes(photos.photo(DOG, 11702))
    (train / "dog.11702.jpg").write_bytes(data[: len(data) // 2])
    (train / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(100))
    labels = photos.kaggle_test(test, [DOG, CAT, CAT, DOG, DOG])
    return train, test, labels


def test_example_end_to_end_kaggle_layout(example, tmp_path: Path, capsys) -> None:
    train, test, test_labels = _kaggle(tmp_path / "kaggle")
    out = tmp_path / "out"
    assert example.main(["--data", str(train), "--test", str(test), "--out", str(out), *VGG]) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    metrics = json.loads((out / "metrics.json").read_text())
    # 10 per class, a quarter of each (2.5, rounded up) for validation
    assert metrics["counts"] == {"images": 20, "train": 14, "val": 6, "bad": 3}
    assert [(Path(b["path"]).name, b["reason"].split(" (")[0]) for b in metrics["bad_files"]] == [
        ("Thumbs.db", "not an image"),
        ("cat.666.jpg", "empty file"),
        ("dog.11702.jpg", "truncated image data"),
    ]
    assert "cat.666.jpg: empty file (0 bytes)" in stdout
    # it learned the classes, and the reloaded checkpoint agrees
    assert metrics["train"]["accuracy"] == 1.0 and metrics["val"]["accuracy"] == 1.0
    assert metrics["val"]["confusion_matrix"] == [[3, 0], [0, 3]]
    assert metrics["reloaded_val_accuracy"] == metrics["val"]["accuracy"]
    assert "reloaded" in stdout and "(same)" in stdout
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3, 4, 5]
    # submission.csv: every test id in numeric order, label = probability of dog
    rows = list(csv.reader((out / "submission.csv").open()))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == list(test_labels)
    assert [float(r[1]) > 0.5 for r in rows[1:]] == [label == DOG for label in test_labels.values()]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["class_names"] == ["cat", "dog"]
    split = Split.from_dict(checkpoint["extra"]["split"])
    assert (len(split.train), len(split.val), split.seed) == (14, 6, 0)
    assert sorted(Path(f).name for f in split.files) == sorted(
        [f"cat.{i}.jpg" for i in range(10)] + [f"dog.{i}.jpg" for i in range(10)]
    )


def test_example_petimages_layout_with_append_and_fine_tune(example, tmp_path: Path) -> None:
    root = tmp_path / "PetImages"
    photos.petimages(root, 8)
    (root / "Cat" / "666.jpg").write_bytes(b"")
    out = tmp_path / "out"
    args = ["--data", str(root), "--out", str(out), "--method", "append", "--fine-tune-epochs", "1", *SMALL]
    assert example.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == ["cat", "dog"]
    assert metrics["counts"] == {"images": 16, "train": 12, "val": 4, "bad": 1}
    # two epochs of the head, then one of every layer, the features at a tenth of the rate
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert [r["lr"] for r in metrics["history"]] == [1e-3, 1e-3, 1e-3]
    assert [r.get("features_lr") for r in metrics["history"]] == [None, None, pytest.approx(1e-4)]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["unfreeze_lr"] == pytest.approx(1e-4)
    # append: the whole 1000-class network is kept and the head goes after it, 1000 -> 500 -> 2
    model = checkpoint["model"]
    assert model["net.fc.weight"].shape == (1000, 512) and model["classifier.0.weight"].shape == (500, 1000)
    assert model["classifier.3.weight"].shape == (2, 500)


def test_example_default_data_is_oxford_pets(example, tmp_path: Path, capsys, monkeypatch) -> None:
    import torchvision.datasets.oxford_iiit_pet as oxford

    def no_download(*args, **kwargs):
        raise AssertionError("the example downloaded Oxford-IIIT Pet although it was cached")

    monkeypatch.setattr(oxford, "download_and_extract_archive", no_download)
    listed = photos.oxford_layout(tmp_path / "data", per_breed=4)
    out = tmp_path / "out"
    assert example.main(["--data-root", str(tmp_path / "data"), "--out", str(out), *SMALL]) == 0
    stdout = capsys.readouterr().out
    assert (
        f"No --data given: using the Oxford-IIIT Pet dataset (cat vs dog), cached under {tmp_path / 'data'}/"
        in stdout
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == ["cat", "dog"]
    # the trainval listing, not the test one: 8 of each species, a quarter of them for validation
    assert metrics["counts"] == {"images": len(listed["trainval"]), "train": 12, "val": 4, "bad": 0}
    assert [sum(row) for row in metrics["val"]["confusion_matrix"]] == [2, 2]


def test_example_offline_without_data_explains_where_to_get_it(
    example, tmp_path: Path, capsys, monkeypatch
) -> None:
    import torchvision.datasets.oxford_iiit_pet as oxford

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(oxford, "download_and_extract_archive", offline)
    assert example.main(["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("No data: <urlopen error [Errno -3] Temporary failure in name resolution>\n")
    assert "Kaggle's Dogs vs Cats" in err and "PetImages" in err and "Oxford-IIIT Pet" in err
    assert f"it downloads into --data-root ({tmp_path / 'data'})" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_example_offline_weights_explains_how_to_provide_them(
    example, tmp_path: Path, capsys, monkeypatch, torch_home
) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    train = tmp_path / "train"
    photos.kaggle_train(train, 3)
    args = ["--data", str(train), "--out", str(tmp_path / "out"), "--arch", "vgg11", "--weights", "DEFAULT"]
    assert example.main([*args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "Cannot load the pretrained weights:\ncould not download the pretrained weights VGG11_Weights.IMAGENET1K_V1"
    )
    assert "copy the file to the cache file path above" in err and err.rstrip().endswith("--weights none")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_example_runs_unchanged_under_torchrun(tmp_path: Path) -> None:
    """Also the test that runs the file as a script (the others call its main() in this process)."""
    from helpers import torchrun

    train, test, test_labels = _kaggle(tmp_path / "kaggle", n=6)
    out = tmp_path / "out"
    result = torchrun(str(EXAMPLE), "--data", str(train), "--test", str(test), "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("training resnet18 (replace) on cpu, 2 processes") == 1  # rank 0 alone prints
    assert result.stdout.count("(same)") == 1
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"] == {"images": 12, "train": 8, "val": 4, "bad": 3}
    rows = list(csv.reader((out / "submission.csv").open()))
    assert [r[0] for r in rows[1:]] == list(test_labels)  # written once, not once per process


def _held_out(n: int, fraction: float) -> int:
    """How many of a class of n stratified_split holds out (rounded half up, one to n - 1)."""
    return min(max(math.floor(fraction * n + 0.5), 1), n - 1) if n > 1 else 0


@pytest.mark.real_photos
def test_example_trains_on_the_whole_real_sample(example, pets_dir: Path, tmp_path: Path) -> None:
    """Every real photo through the script once; the counts come from the folder itself."""
    out = tmp_path / "out"
    args = ["--data", str(pets_dir), "--out", str(out), *OPTIONS, "--arch", "resnet18", "--epochs", "1"]
    assert example.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    classes = sorted(p.name for p in pets_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert metrics["class_names"] == classes
    files = {name: [p for p in (pets_dir / name).rglob("*") if p.is_file()] for name in classes}
    bad = {Path(b["path"]) for b in metrics["bad_files"]}
    usable = {name: len(set(paths) - bad) for name, paths in files.items()}
    assert bad <= {p for paths in files.values() for p in paths}
    held_out = [_held_out(usable[name], 0.25) for name in classes]
    assert metrics["counts"] == {
        "images": sum(usable.values()),
        "train": sum(usable.values()) - sum(held_out),
        "val": sum(held_out),
        "bad": len(bad),
    }
    assert [sum(row) for row in metrics["val"]["confusion_matrix"]] == held_out
    assert len(metrics["history"]) == 1 and math.isfinite(metrics["history"][0]["train_loss"])
    assert metrics["reloaded_val_accuracy"] == metrics["val"]["accuracy"]


def test_example_seed_makes_the_whole_run_repeatable(example, tmp_path: Path) -> None:
    root = tmp_path / "PetImages"
    photos.petimages(root, 6)
    histories = []
    for run, outside in enumerate((1, 2)):
        torch.manual_seed(outside)  # whatever state the caller left the global generator in
        out = tmp_path / f"out{run}"
        assert example.main(["--data", str(root), "--out", str(out), "--seed", "3", *SMALL]) == 0
        histories.append([r["train_loss"] for r in json.loads((out / "metrics.json").read_text())["history"]])
    assert histories[0] == histories[1]
