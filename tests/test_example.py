"""examples/dogs_vs_cats.py end to end, offline, on small copies of the real photos."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dogs_vs_cats.py"
SMALL = [
    "--weights",
    "none",
    "--arch",
    "vgg11",
    "--image-size",
    "32",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--device",
    "cpu",
    "--val-fraction",
    "0.25",
]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("dogs_vs_cats_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kaggle(pets_dir: Path, root: Path, n: int = 10) -> tuple[Path, Path]:
    train, test = root / "train", root / "test1"
    train.mkdir(parents=True)
    test.mkdir()
    cats, dogs = sorted((pets_dir / "cats").glob("*.jpg")), sorted((pets_dir / "dogs").glob("*.jpg"))
    for i in range(n):
        shutil.copy(cats[i], train / f"cat.{i}.jpg")
        shutil.copy(dogs[i], train / f"dog.{i}.jpg")
    # a few percent of broken files, as in the real archives
    (train / "cat.666.jpg").write_bytes(b"")
    (train / "dog.11702.jpg").write_bytes(cats[0].read_bytes()[:2000])
    (train / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(100))
    for i in range(1, 6):
        shutil.copy(dogs[-i], test / f"{i}.jpg")
    return train, test


def test_example_end_to_end_kaggle_layout(pets_dir: Path, tmp_path: Path) -> None:
    train, test = _kaggle(pets_dir, tmp_path / "kaggle")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--data", str(train), "--test", str(test), "--out", str(out), *SMALL],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "curves.png",
        "metrics.json",
        "submission.csv",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"] == {"images": 20, "train": 14, "val": 6, "bad": 3}
    assert [(Path(b["path"]).name, b["reason"].split(" (")[0]) for b in metrics["bad_files"]] == [
        ("Thumbs.db", "not an image"),
        ("cat.666.jpg", "empty file"),
        ("dog.11702.jpg", "truncated image data"),
    ]
    assert metrics["reloaded_val_accuracy"] == metrics["val"]["accuracy"]
    assert 0.0 <= metrics["train"]["accuracy"] <= 1.0 and len(metrics["history"]) == 2
    assert "reloaded" in result.stdout and "(same)" in result.stdout
    assert "cat.666.jpg: empty file (0 bytes)" in result.stdout
    rows = list(csv.reader((out / "submission.csv").open()))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows[1:])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["class_names"] == ["cat", "dog"] and "split" in checkpoint["extra"]


def test_example_petimages_layout_with_append_and_fine_tune(example, pets_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "PetImages"
    for kind, folder in (("cats", "Cat"), ("dogs", "Dog")):
        (root / folder).mkdir(parents=True)
        for i, photo in enumerate(sorted((pets_dir / kind).glob("*.jpg"))[:8]):
            shutil.copy(photo, root / folder / f"{i}.jpg")
    (root / "Cat" / "666.jpg").write_bytes(b"")
    out = tmp_path / "out"
    # ResNet-18: fine-tuning a whole VGG on a CPU is slow, and the API is the same for every family
    args = ["--data", str(root), "--out", str(out), "--method", "append", "--fine-tune-epochs", "1", *SMALL]
    args += ["--arch", "resnet18"]
    assert example.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == ["cat", "dog"] and metrics["counts"]["bad"] == 1
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert [r["lr"] for r in metrics["history"]] == [1e-3, 1e-3, 1e-3]


def _oxford_layout(pets_dir: Path, root: Path) -> None:
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    rows = list(csv.DictReader((pets_dir / "classification.csv").open()))
    chosen = [r for r in rows if r["species"] == "cat"][:8] + [r for r in rows if r["species"] == "dog"][:8]
    lines = []
    for row in chosen:
        folder = "cats" if row["species"] == "cat" else "dogs"
        shutil.copy(pets_dir / folder / f"{row['image_name']}.jpg", base / "images")
        lines.append(f"{row['image_name']} {row['class_id']} {1 if row['species'] == 'cat' else 2} 1")
    (base / "annotations" / "trainval.txt").write_text("\n".join(lines) + "\n")
    (base / "annotations" / "test.txt").write_text("")


def test_example_default_data_is_oxford_pets(example, pets_dir: Path, tmp_path: Path, capsys) -> None:
    _oxford_layout(pets_dir, tmp_path / "data")
    out = tmp_path / "out"
    assert example.main(["--data-root", str(tmp_path / "data"), "--out", str(out), *SMALL]) == 0
    stdout = capsys.readouterr().out
    assert (
        f"No --data given: using the Oxford-IIIT Pet dataset (cat vs dog), cached under {tmp_path / 'data'}/"
        in stdout
    )
    assert json.loads((out / "metrics.json").read_text())["counts"]["images"] == 16


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
    assert "Traceback" not in err


def test_example_offline_weights_explains_how_to_provide_them(
    example, pets_dir: Path, tmp_path: Path, capsys, monkeypatch, torch_home
) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    train, _ = _kaggle(pets_dir, tmp_path / "kaggle", n=3)
    args = [
        "--data",
        str(train),
        "--out",
        str(tmp_path / "out"),
        "--arch",
        "vgg11",
        "--weights",
        "DEFAULT",
        "--device",
        "cpu",
    ]
    assert example.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "Cannot load the pretrained weights:\ncould not download the pretrained weights VGG11_Weights.IMAGENET1K_V1"
    )
    assert "copy the file to the cache file path above" in err and err.rstrip().endswith("--weights none")


@pytest.mark.slow
def test_example_runs_unchanged_under_torchrun(pets_dir: Path, tmp_path: Path) -> None:
    from helpers import torchrun

    train, test = _kaggle(pets_dir, tmp_path / "kaggle", n=6)
    out = tmp_path / "out"
    result = torchrun(str(EXAMPLE), "--data", str(train), "--test", str(test), "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("training vgg11 (replace) on cpu, 2 processes") == 1  # rank 0 alone prints
    assert result.stdout.count("(same)") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "curves.png",
        "metrics.json",
        "submission.csv",
    ]
    assert json.loads((out / "metrics.json").read_text())["counts"]["bad"] == 3
