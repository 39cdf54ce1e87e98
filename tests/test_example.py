"""examples/dogs_vs_cats.py end to end, offline, on generated photos (and the real sample where it exists).

The generated classes are learnable (tests/photos.py), so these tests also check that the script
learns: a mix-up of images and labels anywhere on the way shows as lost accuracy.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shlex
import urllib.error
from pathlib import Path

import pytest
import torch

import photos
import vggtransfer as vt
from photos import CAT, DOG
from vggtransfer.data import Split

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dogs_vs_cats.py"
OPTIONS = ["--weights", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0"]
OPTIONS += ["--device", "cpu", "--val-fraction", "0.25"]
# ResNet-18 is the cheapest model to build and to checkpoint: fit writes last.pt (and best.pt)
# every epoch, and a VGG's 25088-wide head makes each file about 190 MB even at 32 px. The
# recipe's VGG head itself is tested in test_heads.py; here it is the script that is tested.
SMALL = [*OPTIONS, "--arch", "resnet18", "--epochs", "2"]
# Where the model does not matter: SqueezeNet 1.1's 1.2 M parameters make the fastest run.
TINY = [*OPTIONS, "--arch", "squeezenet1_1", "--epochs", "2"]
# Long enough to learn the generated classes: the features are cached, so epochs cost little.
LEARN = [*OPTIONS, "--arch", "resnet18", "--epochs", "4"]
REPORT = ["confusion_matrix.png", "errors.png", "misclassified.csv", "report.md"]
OUTPUTS = sorted(["best.pt", "last.pt", "curves.png", "metrics.json", "submission.csv", *REPORT])


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
    argv = ["--data", str(train), "--test", str(test), "--out", str(out), *LEARN]
    assert example.main(argv) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    metrics = json.loads((out / "metrics.json").read_text())
    # 10 per class, a quarter of each (2.5, rounded up) for validation
    assert metrics["counts"] == {"images": 20, "train": 14, "val": 6, "bad": 3}
    bad = [
        ("Thumbs.db", "not an image"),
        ("cat.666.jpg", "empty file"),
        ("dog.11702.jpg", "truncated image data"),
    ]
    assert [(Path(b["path"]).name, b["reason"].split(" (")[0]) for b in metrics["bad_files"]] == bad
    assert "cat.666.jpg: empty file (0 bytes)" in stdout
    # it learned the classes, and the checkpoint reloaded by vt.load_model agrees
    assert metrics["train"]["accuracy"] == 1.0 and metrics["val"]["accuracy"] == 1.0
    assert metrics["val"]["confusion_matrix"] == [[3, 0], [0, 3]]
    assert metrics["reloaded_val_accuracy"] == metrics["val"]["accuracy"]
    assert f"reloaded {out / 'last.pt'}: validation accuracy 100.00% (same)" in stdout
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3, 4]
    # submission.csv: every test id in numeric order, label = probability of dog
    rows = list(csv.reader((out / "submission.csv").open()))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == list(test_labels)
    assert [float(r[1]) > 0.5 for r in rows[1:]] == [label == DOG for label in test_labels.values()]
    assert f"wrote {out / 'submission.csv'} (5 rows, 0 unreadable files skipped)" in stdout
    for png in ("curves.png", "confusion_matrix.png", "errors.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the report: the validation set, the scan's bad files, the model and the command to rerun
    report = (out / "report.md").read_text()
    assert "6 samples in 2 classes." in report
    assert "Image scan: 20 good images, 3 bad files (left out)." in report
    assert f"| `{train / 'cat.666.jpg'}` | empty file (0 bytes) |" in report
    assert "- accuracy: 1.0000 (6 of 6 correct, 0 errors)" in report
    assert (
        "## Model\n\nresnet18 (random weights), classifier replaced, 2 classes, 32 px; 4 epochs with the features frozen\n"
        in report
    )
    assert f"```sh\npython examples/dogs_vs_cats.py {shlex.join(argv)}\n```" in report
    assert (out / "misclassified.csv").read_text() == "path,true,predicted,probability\n"
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["class_names"] == ["cat", "dog"] and checkpoint["trainer"]["epoch"] == 4
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
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["trainer"]["unfreeze_lr"] == pytest.approx(1e-4)
    model_line = "resnet18 (random weights), head appended, 2 classes, 32 px; 2 epochs with the features "
    assert model_line + "frozen, then 1 more with every layer trained\n" in (out / "report.md").read_text()
    # append: the whole 1000-class network is kept and the head goes after it, 1000 -> 500 -> 2
    model = checkpoint["model"]
    assert model["net.fc.weight"].shape == (1000, 512) and model["classifier.0.weight"].shape == (500, 1000)
    assert model["classifier.3.weight"].shape == (2, 500)


def test_example_default_data_is_oxford_pets_and_default_weights_come_from_the_cache(
    example, tmp_path: Path, capsys, monkeypatch, torch_home
) -> None:
    """The README's main command (no --data, --weights DEFAULT) on a machine that has both cached."""
    import torchvision.datasets.oxford_iiit_pet as oxford
    from torchvision.models import ResNet18_Weights, resnet18

    def no_download(*args, **kwargs):
        raise AssertionError("the example downloaded although the data and the weights were cached")

    monkeypatch.setattr(oxford, "download_and_extract_archive", no_download)
    monkeypatch.setattr(torch.hub, "urlopen", no_download)
    listed = photos.oxford_layout(tmp_path / "data", per_breed=4)
    # stand-in "pretrained" weights, under the file name torchvision downloads them to
    pretrained = resnet18().state_dict()
    cached = vt.cached_weights_path(ResNet18_Weights.DEFAULT)
    cached.parent.mkdir(parents=True)
    torch.save(pretrained, cached)
    out = tmp_path / "out"
    options = [option for option in SMALL if option not in ("--weights", "none")]
    assert example.main(["--data-root", str(tmp_path / "data"), "--out", str(out), *options]) == 0
    stdout = capsys.readouterr().out
    assert (
        f"No --data given: using the Oxford-IIIT Pet dataset (cat vs dog), cached under {tmp_path / 'data'}/"
        in stdout
    )
    assert "(same)" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == ["cat", "dog"]
    # the trainval listing, not the test one: 8 of each species, a quarter of them for validation
    assert metrics["counts"] == {"images": len(listed["trainval"]), "train": 12, "val": 4, "bad": 0}
    assert [sum(row) for row in metrics["val"]["confusion_matrix"]] == [2, 2]
    # the frozen features are the cached file's, unchanged by training
    model = torch.load(out / "last.pt", weights_only=True)["model"]
    assert torch.equal(model["conv1.weight"], pretrained["conv1.weight"])
    assert "resnet18 (DEFAULT weights), classifier replaced" in (out / "report.md").read_text()


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
    assert "copy the file to the cache file path above" in err
    assert err.endswith(
        "\nWith this script, pass that file as --weights /path/to/the/file.pth, or run without transfer\n"
        "learning (random weights, much lower accuracy): --weights none\n"
    )
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
    # vt.write_report evaluates in one process: under torchrun the script says so and goes on
    skipped = (
        f"skipped the report: vt.write_report runs in one process, not 2 (write it from {out / 'last.pt'}"
    )
    assert result.stdout.count(skipped) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(set(OUTPUTS) - set(REPORT))
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
        assert example.main(["--data", str(root), "--out", str(out), "--seed", "3", *TINY]) == 0
        histories.append([r["train_loss"] for r in json.loads((out / "metrics.json").read_text())["history"]])
    assert histories[0] == histories[1]


def test_example_reload_check_reports_a_reloaded_model_that_differs(
    example, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The reload check compares the file's model with the trained one: a changed file shows."""
    real_load_model = vt.load_model

    def load_negated(*args, **kwargs):
        loaded = real_load_model(*args, **kwargs)
        with torch.no_grad():
            loaded.model.fc[-1].weight.neg_()  # every prediction flips
            loaded.model.fc[-1].bias.neg_()
        return loaded

    monkeypatch.setattr(vt, "load_model", load_negated)
    root = tmp_path / "PetImages"
    photos.petimages(root, 6)
    out = tmp_path / "out"
    assert example.main(["--data", str(root), "--out", str(out), "--seed", "3", *SMALL]) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] == 1.0 and metrics["reloaded_val_accuracy"] == 0.0
    assert f"reloaded {out / 'last.pt'}: validation accuracy 0.00% (DIFFERENT)" in capsys.readouterr().out


def test_example_refuses_bad_options_before_writing_anything(example, tmp_path: Path, capsys) -> None:
    train = tmp_path / "train"
    photos.kaggle_train(train, 3)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--data", str(train), "--out", str(out), *SMALL, "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "argument --epochs: expected a whole number >= 1 but got '0'" in capsys.readouterr().err
    # a value only the library can judge: its message, as a usage error, not a traceback
    assert example.main(["--data", str(train), "--out", str(out), *SMALL, "--val-fraction", "1.5"]) == 2
    assert capsys.readouterr().err == "error: stratified_split: expected val_fraction in (0, 1) but got 1.5\n"
    assert not out.exists()


def test_example_test_folder_needs_a_dog_class_to_write_a_submission(example, tmp_path: Path, capsys) -> None:
    photos.class_folders(tmp_path / "birds", {"finch": 3, "robin": 3})
    test = tmp_path / "test1"
    photos.kaggle_test(test, [DOG, CAT])
    out = tmp_path / "out"
    args = ["--data", str(tmp_path / "birds"), "--test", str(test), "--out", str(out), *SMALL]
    assert example.main(args) == 2
    err = capsys.readouterr().err
    assert err == "error: --test writes the probability of a dog, but the classes are ['finch', 'robin']\n"
    assert not out.exists()
