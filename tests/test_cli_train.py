"""``vggtransfer train``, ``evaluate`` and ``export`` end to end, factories, and every error path.

One small run (squeezenet1_1 with random weights on 32 px generated photos) is trained once for the
module; the tests read its run folder, then predict and export from its best.pt.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import photos
import vggtransfer as vt
from vggtransfer._cli import main
from vggtransfer.data import DogsVsCats

RUN_FILES = {
    "best.pt", "last.pt", "metrics.json", "curves.png", "confusion_matrix.png", "errors.png",
    "misclassified.csv", "report.md", "history.csv",
}  # fmt: skip

FACTORIES = """
import pathlib
import torch
from torch import nn

pathlib.Path("imported.marker").write_text("my_models was imported")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(8, 1000))

    def forward(self, x):
        return self.classifier(self.features(x))


def tiny():
    torch.manual_seed(0)
    return Tiny()


def other():
    return Tiny()


def number():
    return 3


def broken():
    return 1 / 0


def leave():
    import sys

    sys.exit(0)
"""


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    photos.class_folders(root / "pets", {"cats": 10, "dogs": 10})
    (root / "pets" / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    photos.class_folders(root / "holdout", {"cats": 3, "dogs": 3}, seed=100)
    # Validation with one mislabelled photo per class, so that the report has errors to show.
    photos.class_folders(root / "val", {"cats": 3, "dogs": 3}, seed=200)
    photos.write_photos(root / "val" / "cats", photos.DOG, ["dog-among-cats.jpg"], seed=300)
    photos.write_photos(root / "val" / "dogs", photos.CAT, ["cat-among-dogs.jpg"], seed=400)
    return root


@pytest.fixture(scope="module")
def run(workspace: Path) -> tuple[Path, str]:
    """The run folder of one training with a test folder and a fine-tuning epoch; what it printed."""
    out = workspace / "run"
    argv = [
        "train",
        str(workspace / "pets"),
        "--val",
        str(workspace / "val"),
        "--test",
        str(workspace / "holdout"),
    ]
    argv += ["--arch", "squeezenet1_1"]
    argv += ["--weights", "none", "--image-size", "32", "--epochs", "3", "--fine-tune-epochs", "1"]
    argv += ["--batch-size", "4", "--device", "cpu", "--out", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return out, printed.getvalue()


def test_train_writes_the_run_folder_and_says_where_everything_is(run: tuple[Path, str]) -> None:
    out, printed = run
    assert {p.name for p in out.iterdir()} == RUN_FILES
    pets = out.parent / "pets"
    assert printed.splitlines()[:2] == [
        f"DATA {pets}: 20 images (cats 10, dogs 10); 1 files left out",
        f"  left out {pets / 'dogs' / 'broken.jpg'}: not an image (Pillow cannot identify the format)",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["best_epoch"]
    assert printed.splitlines()[-4:] == [
        f"run folder {out}:",
        f"  {out / 'best.pt'}   epoch {best} (lowest val_loss, "
        f"{metrics['history'][best - 1]['val_loss']:.4f}); last.pt",
        f"  {out / 'report.md'}   with confusion_matrix.png, errors.png, misclassified.csv",
        f"  {out / 'metrics.json'}   and curves.png, history.csv",
    ]


def test_metrics_and_report_agree_with_each_other_and_with_best_pt(
    run: tuple[Path, str], workspace: Path
) -> None:
    out, _ = run
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]  # 3 head epochs, then 1 fine-tuning epoch
    assert "features_lr" in history[-1] and "features_lr" not in history[0]
    assert metrics["best_epoch"] == min(history, key=lambda r: r["val_loss"])["epoch"]
    logged = list(csv.DictReader((out / "history.csv").open()))  # the live log: the same epochs
    assert [float(r["val_loss"]) for r in logged] == [r["val_loss"] for r in history]
    val = metrics["val"]
    rows = list(csv.DictReader((out / "misclassified.csv").open()))
    assert len(rows) == round(val["count"] * (1 - val["accuracy"]))  # one row per error
    assert sum(map(sum, val["confusion_matrix"])) == val["count"] == 8
    assert len(rows) >= 2  # at least the mislabelled ones
    # Two classes: the higher the loss, the more probable the wrong prediction.
    assert [float(r["probability"]) for r in rows] == sorted(
        (float(r["probability"]) for r in rows), reverse=True
    )
    assert all(r["true"] != r["predicted"] for r in rows)
    # best.pt holds the reported epoch: reloaded, it scores what metrics.json says on the same split.
    model, names, transform = vt.load_model(out / "best.pt")
    val_set = DogsVsCats(workspace / "val", transform=transform, progress=False)
    again = vt.Trainer(model, device="cpu", class_names=names, transform=transform, progress=False)
    result = again.evaluate(val_set, num_workers=0)
    assert result["accuracy"] == val["accuracy"] and result["loss"] == pytest.approx(val["loss"], abs=1e-5)
    assert result["loss"] == pytest.approx(history[metrics["best_epoch"] - 1]["val_loss"], abs=1e-4)
    assert metrics["test"]["count"] == 6
    report = (out / "report.md").read_text()
    assert f"({val['count'] - len(rows)} of {val['count']} correct, {len(rows)} errors)" in report
    assert (
        f"Trained on 20 images of `{workspace / 'pets'}` (cats 10, dogs 10); validated on 8 images of "
        f"`{workspace / 'val'}`; tested on 6 images of `{workspace / 'holdout'}`.\n\nEvaluated: 8 samples"
    ) in report
    assert "Image scan: 20 good images, 1 bad files (left out)." in report
    assert str(workspace / "pets" / "dogs" / "broken.jpg") in report
    assert "`squeezenet1_1`; weights `random`" in report
    assert all(f"| {phase} |" in report for phase in ("scan", "build", "fit", "fine-tune"))
    assert metrics["command"] in report and metrics["command"].startswith("vggtransfer train ")


def test_run_pngs_are_images_of_a_sensible_size(run: tuple[Path, str]) -> None:
    out, _ = run
    for name in ("curves.png", "confusion_matrix.png", "errors.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 400 <= width <= 4000 and 250 <= height <= 4000, (name, image.size)
            assert len(set(np.asarray(image.convert("L")).ravel().tolist())) > 10  # not blank


def test_predict_then_export_give_the_same_probabilities_in_onnxruntime(
    run: tuple[Path, str], workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    best, predictions = run[0] / "best.pt", tmp_path / "predictions.csv"
    assert _run(["predict", str(best), str(workspace / "holdout"), "--csv", str(predictions)], capsys)[0] == 0
    rows = list(csv.DictReader(predictions.open()))
    assert len(rows) == 6
    status, printed, _ = _run(
        ["export", str(best), "--format", "onnx", "--out", str(tmp_path / "m.onnx")], capsys
    )
    assert status == 0 and printed.startswith(f"wrote {tmp_path / 'm.onnx'} (onnx, input [batch, 3, 32, 32]")
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    transform = vt.ImageTransform.from_dict(json.loads(metadata["transform"]))
    names = json.loads(metadata["class_names"])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    images = torch.stack([transform(Image.open(row["path"])) for row in rows]).numpy()
    (logits,) = session.run(None, {"image": images})
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1)
    for row, p in zip(rows, probabilities, strict=True):
        assert names[int(p.argmax())] == row["label"]
        assert float(p.max()) == pytest.approx(float(row["probability"]), abs=1e-5)
    status, _, _ = _run(
        ["export", str(best), "--format", "torchscript", "--out", str(tmp_path / "m.ts")], capsys
    )
    assert status == 0 and torch.jit.load(str(tmp_path / "m.ts"))(torch.from_numpy(images)).shape == (6, 2)


def test_evaluate_prints_the_metrics_train_reported_and_writes_a_report(
    run: tuple[Path, str], workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = run
    test = json.loads((out / "metrics.json").read_text())["test"]
    status, printed, _ = _run(["evaluate", str(out / "best.pt"), str(workspace / "holdout")], capsys)
    assert status == 0
    assert printed.splitlines()[0] == (
        f"accuracy {test['accuracy']:.4f}, balanced accuracy {test['balanced_accuracy']:.4f}, "
        f"loss {test['loss']:.4f} on 6 images"
    )
    report = tmp_path / "report"
    argv = ["evaluate", str(out / "best.pt"), str(workspace / "holdout"), "--report", str(report)]
    status, printed, _ = _run(argv, capsys)
    assert status == 0 and printed.splitlines()[-1] == (
        f"wrote {report / 'report.md'}, confusion_matrix.png, errors.png, misclassified.csv"
    )
    assert {p.name for p in report.iterdir()} == {
        "report.md",
        "confusion_matrix.png",
        "errors.png",
        "misclassified.csv",
    }
    assert "vggtransfer evaluate " in (report / "report.md").read_text()


@pytest.fixture
def factory_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding pets/ and my_models.py (which leaves imported.marker when imported)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_models.py").write_text(FACTORIES)
    photos.class_folders(tmp_path / "pets", {"cats": 5, "dogs": 5})
    yield tmp_path
    import sys

    sys.modules.pop("my_models", None)


TRAIN_TINY = ["--image-size", "32", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]


def test_a_factory_model_trains_and_loads_only_when_named_again(
    factory_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, printed, err = _run(["train", "pets", "--arch", "my_models:tiny", *TRAIN_TINY], capsys)
    assert status == 0, err
    assert "run folder runs/train:" in printed
    assert _run(["train", "pets", "--arch", "my_models:tiny", *TRAIN_TINY], capsys)[0] == 0
    assert (factory_folder / "runs" / "train2" / "best.pt").is_file()  # numbered: the first run is kept
    status, _, err = _run(["train", "pets", "--arch", "my_models:tiny", "--weights", "none"], capsys)
    assert (status, err) == (
        2,
        "vggtransfer train: error: --weights applies to torchvision and timm names; the factory "
        "'my_models:tiny' loads its own weights\n",
    )
    best = "runs/train/best.pt"
    status, _, err = _run(["predict", best, "pets", "--csv", "p.csv"], capsys)
    assert status == 2 and err == (
        f"vggtransfer predict: error: checkpoint '{best}' holds a model built by the factory "
        "'my_models:tiny'; checkpoints never import code, so name it again: --arch my_models:tiny\n"
    )
    status, _, err = _run(["export", best, "--out", "m.onnx", "--arch", "my_models:other"], capsys)
    assert status == 2 and err == (
        f"vggtransfer export: error: --arch 'my_models:other' does not match checkpoint '{best}', which "
        "was trained with --arch my_models:tiny; pass --arch my_models:tiny, or leave --arch out for "
        "torchvision and timm models\n"
    )
    status, _, err = _run(["evaluate", best, "pets", "--arch", "resnet18"], capsys)
    assert status == 2 and "does not match checkpoint" in err
    assert not (factory_folder / "m.onnx").exists() and not (factory_folder / "p.csv").exists()
    assert _run(["predict", best, "pets", "--csv", "p.csv", "--arch", "my_models:tiny"], capsys)[0] == 0
    assert len(Path("p.csv").read_text().splitlines()) == 1 + 10
    assert (
        _run(
            ["export", best, "--format", "torchscript", "--out", "m.ts", "--arch", "my_models:tiny"], capsys
        )[0]
        == 0
    )


def test_a_checkpoint_never_makes_vggtransfer_import_its_factory(
    factory_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["train", "pets", "--arch", "my_models:tiny", *TRAIN_TINY], capsys)[0] == 0
    import sys

    sys.modules.pop("my_models", None)
    (factory_folder / "imported.marker").unlink()
    for argv in (
        ["predict", "runs/train/best.pt", "pets"],
        ["export", "runs/train/best.pt", "--out", "x.onnx"],
    ):
        assert _run(argv, capsys)[0] == 2
    assert not (factory_folder / "imported.marker").exists()


@pytest.mark.parametrize(
    ("arch", "status", "message"),
    [
        (
            "my_models:nothing",
            2,
            "vggtransfer train: error: --arch 'my_models:nothing': module 'my_models' has no attribute "
            "'nothing'; its callables are Tiny, broken, leave, number, other, tiny",
        ),
        (
            "my_models:number",
            2,
            "vggtransfer train: error: --arch 'my_models:number': expected the factory to return an "
            "nn.Module but it returned a int",
        ),
        (
            "my_models:broken",
            1,
            "vggtransfer train: failed: FactoryError: --arch 'my_models:broken': calling it raised "
            "ZeroDivisionError: division by zero ({folder}/my_models.py, line {line})",
        ),
        (
            "my_models:leave",
            1,
            "vggtransfer train: failed: FactoryError: --arch 'my_models:leave': calling it raised SystemExit "
            "(sys.exit(0)) instead of returning a model ({folder}/my_models.py, line {exit_line})",
        ),
        (
            "syntax.py:build",
            1,
            "vggtransfer train: failed: FactoryError: --arch 'syntax.py:build': importing 'syntax.py' raised "
            "SyntaxError: invalid syntax ({folder}/syntax.py, line 2)",
        ),
        (
            "not_there:build",
            2,
            "vggtransfer train: error: --arch 'not_there:build': no module named 'not_there' here or in the "
            "working folder; run from the folder that holds it, or name the file: path/to/not_there.py:build",
        ),
        (
            "nope.py:build",
            2,
            "vggtransfer train: error: --arch 'nope.py:build': there is no file 'nope.py'",
        ),
        (
            "my models:",
            2,
            "vggtransfer train: error: expected --arch to be a torchvision model name (vgg16_bn), "
            "timm:NAME, or module:callable (my_models:build), but got 'my models:'",
        ),
    ],
)
def test_factory_errors_say_what_is_wrong_and_write_nothing(
    arch: str, status: int, message: str, factory_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (factory_folder / "syntax.py").write_text("import torch\ndef build(:\n")
    result, _, err = _run(["train", "pets", "--arch", arch, *TRAIN_TINY], capsys)
    line = FACTORIES.splitlines().index("    return 1 / 0") + 1
    exit_line = FACTORIES.splitlines().index("    sys.exit(0)") + 1
    expected = message.format(folder=factory_folder, line=line, exit_line=exit_line)
    assert (result, err) == (status, expected + "\n")
    assert not (factory_folder / "runs").exists()


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    photos.class_folders(tmp_path / "pets", {"cats": 4, "dogs": 4})
    photos.class_folders(tmp_path / "birds", {"crows": 2, "owls": 2})
    photos.class_folders(tmp_path / "lonely", {"cats": 3})
    photos.kaggle_test(tmp_path / "test1", [photos.CAT, photos.DOG])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    (tmp_path / "file.pt").write_text("x")
    return tmp_path


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["{t}/missing"],
            "DATA '{t}/missing' does not exist; expected a folder of images (class folders, "
            "Kaggle's flat train/ or PetImages)",
        ),
        (["{t}/pets", "--val-split", "1.5"], "expected --val-split to be between 0 and 1 but got 1.5"),
        (["{t}/pets", "--epochs", "0"], "expected --epochs to be 1 or more but got 0"),
        (["{t}/pets", "--fine-tune-epochs", "-1"], "expected --fine-tune-epochs to be 0 or more but got -1"),
        (["{t}/pets", "--lr", "-0.1"], "expected --lr to be more than 0 but got -0.1"),
        (["{t}/pets", "--lr", "nan"], "expected --lr to be more than 0 but got nan"),
        (["{t}/pets", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["{t}/pets", "--image-size", "16"], "expected --image-size to be 32 to 4096 (pixels) but got 16"),
        (
            ["{t}/pets", "--image-size", "100000"],
            "expected --image-size to be 32 to 4096 (pixels) but got 100000",
        ),
        (
            ["{t}/pets", "--seed", str(2**63)],
            f"expected --seed to be at most 2**63 - 1 but got {2**63}",
        ),
        (
            ["{t}/pets", "--out", "{t}/pets/cats/run"],
            "--out '{t}/pets/cats/run' is inside DATA '{t}/pets'; expected a folder outside the images, so "
            "that the files written never mix with them (e.g. runs/...)",
        ),
        (
            ["{t}/pets", "--cache-views", "2"],
            "--cache-views caches augmented views of the training images: it needs --augment",
        ),
        (["{t}/pets", "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (
            ["{t}/pets", "--arch", "vgg17"],
            "--arch: unknown architecture 'vgg17'; did you mean 'vgg19', 'vgg16', 'vgg13'? expected a torchvision "
            "model name (vgg16_bn), timm:NAME, or module:callable (my_models:build)",
        ),
        (
            ["{t}/pets", "--out", "{t}/full"],
            "--out '{t}/full' exists and is not an empty folder; a run never overwrites another",
        ),
        (
            ["{t}/pets", "--test", "{t}/test1"],
            "--test '{t}/test1' has no labels (no class folders, no cat./dog. "
            "names); expected class folders, Kaggle's flat train/ or PetImages",
        ),
        (
            ["{t}/pets", "--val", "{t}/birds"],
            "--val '{t}/birds' has the classes ['crows', 'owls'] but DATA has "
            "['cats', 'dogs']; expected the same class folders in both",
        ),
        (
            ["{t}/pets", "--arch", "resnet18", "--weights", "{t}/missing.pth"],
            "weights file '{t}/missing.pth' does not exist; expected a path to a .pth file",
        ),
        (
            ["{t}/pets", "--arch", "resnet18", "--weights", "none", "--device", "gpu"],
            "expected --device to be",
        ),
        # Pretrained weights (the default) and the download refused: these must fail before it.
        (["{t}/pets", "--device", "cuda:7"], "--device 'cuda:7' was requested but"),
        (["{t}/pets", "--precision", "fp16"], "--precision 'fp16' needs a GPU; on the CPU use 'bf16'"),
        (
            ["{t}/lonely"],
            "DATA '{t}/lonely' has 1 class (cats); expected 2 or more class folders (or Kaggle's "
            "cat.N.jpg / dog.N.jpg names)",
        ),
        (
            ["{t}/pets", "--class-weights", "1,2,3"],
            "expected one --class-weights value per class of DATA (cats, dogs) but got 3: 1,2,3",
        ),
        (
            ["{t}/pets", "--val", "{t}/pets"],
            "--val '{t}/pets' shares images with DATA '{t}/pets'; expected a separate folder (or leave "
            "--val out and let --val-split hold some of DATA out)",
        ),
        (
            ["{t}/pets", "--test", "{t}/pets/cats"],
            "--test '{t}/pets/cats' shares images with DATA '{t}/pets'; expected a separate folder",
        ),
        (
            ["{t}/pets", "--test", "{t}/birds"],
            "--test has the classes ['crows', 'owls'] but DATA has ['cats', 'dogs']",
        ),
        (
            ["{t}/pets", "--val", "{t}/birds", "--val-split", "0.3"],
            "argument --val-split: not allowed with argument --val",
        ),
    ],
)
def test_train_usage_errors_exit_2_before_anything_is_written(
    options: list[str], message: str, folders: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded weights before refusing what was typed")

    monkeypatch.chdir(folders)
    monkeypatch.setattr(torch.hub, "urlopen", no_download)
    status, _, err = _run(["train", *(o.format(t=folders) for o in options)], capsys)
    assert status == 2
    assert err.startswith("vggtransfer train: error: " + message.format(t=folders)), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (folders / "runs").exists() and (folders / "full" / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["evaluate", "{t}/missing.pt", "{t}/pets"],
            "vggtransfer evaluate: error: CHECKPOINT '{t}/missing.pt' is not a file",
        ),
        (
            ["evaluate", "{best}", "{t}/birds"],
            "vggtransfer evaluate: error: DATA '{t}/birds' has the classes "
            "['crows', 'owls'] but the checkpoint was trained on ['cats', 'dogs']; expected the same class folders",
        ),
        (
            ["evaluate", "{best}", "{t}/pets", "--report", "{t}/file.pt"],
            "vggtransfer evaluate: error: --report '{t}/file.pt' exists and is not an empty folder; a run never overwrites another",
        ),
        (
            ["evaluate", "{best}", "{t}/pets", "--report", "{t}/full"],
            "vggtransfer evaluate: error: --report '{t}/full' exists and is not an empty folder; a run never "
            "overwrites another",
        ),
        (
            ["evaluate", "{t}/file.pt", "{t}/pets"],
            "vggtransfer evaluate: error: '{t}/file.pt' is not a vggtransfer checkpoint: it is a text file",
        ),
        (
            ["evaluate", "{best}", "{t}/pets", "--report", "{t}/pets/report"],
            "vggtransfer evaluate: error: --report '{t}/pets/report' is inside DATA '{t}/pets'; expected a "
            "folder outside the images, so that the files written never mix with them (e.g. runs/...)",
        ),
        (["export", "{best}"], "vggtransfer export: error: the following arguments are required: --out"),
        (
            ["export", "{best}", "--out", "{best}"],
            "vggtransfer export: error: --out '{best}' is the checkpoint itself; expected another file",
        ),
        (
            ["export", "{best}", "--out", "{t}/full"],
            "vggtransfer export: error: --out '{t}/full' is a folder; "
            "expected a file name such as model.onnx",
        ),
        (
            ["export", "{best}", "--out", "{t}/file.pt/m.onnx"],
            "vggtransfer export: error: --out '{t}/file.pt/m.onnx' is in '{t}/file.pt', which is a file; "
            "expected a path in a folder",
        ),
        (
            ["export", "{best}", "--out", "{t}/m.onnx", "--format", "tflite"],
            "vggtransfer export: error: argument --format: invalid choice: 'tflite'",
        ),
    ],
)
def test_evaluate_and_export_usage_errors_exit_2(
    argv: list[str], message: str, run: tuple[Path, str], folders: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = run[0] / "best.pt"
    before = best.read_bytes()
    status, _, err = _run([a.format(t=folders, best=best) for a in argv], capsys)
    assert status == 2
    assert err.startswith(message.format(t=folders, best=best)), err
    assert err.count("\n") == 1
    assert best.read_bytes() == before and not (folders / "m.onnx").exists()
    assert not (folders / "pets" / "report").exists()


def test_a_missing_extra_is_a_failure_that_says_what_to_install(
    run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    status, _, err = _run(["export", str(run[0] / "best.pt"), "--out", str(tmp_path / "m.onnx")], capsys)
    assert status == 1 and "pip install" in err and "vggtransfer[export]" in err
    assert not (tmp_path / "m.onnx").exists()


def test_train_without_matplotlib_says_what_to_install_before_training(
    folders: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.chdir(folders)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    status, printed, err = _run(["train", "pets", "--arch", "resnet18", "--weights", "none"], capsys)
    assert status == 1 and 'pip install "vggtransfer[plots]"' in err and "epoch" not in printed + err
    assert not (folders / "runs").exists()


def test_ctrl_c_keeps_the_finished_epochs_and_exits_130(
    folders: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(folders)
    train_epoch = vt.Trainer._train_epoch

    def interrupted_in_epoch_2(self: vt.Trainer, source: object, epoch: int, epochs: int) -> object:
        if epoch == 2:
            raise KeyboardInterrupt
        return train_epoch(self, source, epoch, epochs)

    monkeypatch.setattr(vt.Trainer, "_train_epoch", interrupted_in_epoch_2)
    argv = ["train", "pets", "--arch", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "3"]
    status, _, err = _run([*argv, "--batch-size", "4", "--device", "cpu"], capsys)
    assert status == 130 and err.endswith("vggtransfer: interrupted\n")
    run = folders / "runs" / "train"
    assert {p.name for p in run.iterdir()} == {"best.pt", "last.pt", "interrupted.pt", "history.csv"}
    assert [row["epoch"] for row in csv.DictReader((run / "history.csv").open())] == ["1"]
    assert torch.load(run / "last.pt", weights_only=True)["trainer"]["epoch"] == 1


def test_class_weights_weight_the_loss_and_the_report_says_so(
    factory_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos.class_folders(factory_folder / "imbalanced", {"cats": 9, "dogs": 2})
    argv = ["train", "imbalanced", "--val", "pets", "--arch", "my_models:tiny", *TRAIN_TINY]
    status, _, err = _run([*argv, "--class-weights", "balanced", "--tensorboard", "--out", "run"], capsys)
    assert status == 0, err
    metrics = json.loads(Path("run/metrics.json").read_text())
    assert metrics["class_weights"] == pytest.approx([11 / (2 * 9), 11 / (2 * 2)])
    report = Path("run/report.md").read_text()
    assert "Training data: **Warning: the classes are imbalanced beyond 3:1** ('cats' has 9 samples" in report
    assert "The training loss was weighted per class (cats 0.611, dogs 2.75)." in report
    assert any(Path("run/tensorboard").glob("events.out.tfevents.*"))
    status, _, err = _run([*argv, "--class-weights", "1,2,3", "--out", "other"], capsys)
    assert (status, err) == (
        2,
        "vggtransfer train: error: expected one --class-weights value per class of DATA (cats, dogs) but "
        "got 3: 1,2,3\n",
    )
    status, _, err = _run([*argv, "--class-weights", "1,x", "--out", "other"], capsys)
    assert (status, err) == (
        2,
        "vggtransfer train: error: expected --class-weights to be balanced or one number per class, "
        "such as 1,4, but got '1,x'\n",
    )
    assert not Path("other").exists()


def test_load_model_refuses_a_model_of_another_factory(
    factory_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vggtransfer._arch_spec import parse_arch

    assert _run(["train", "pets", "--arch", "my_models:tiny", *TRAIN_TINY, "--out", "run"], capsys)[0] == 0
    other = vt.replace_classifier(vt.freeze_features(parse_arch("my_models:other").build()), 2)
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(vt.CheckpointError) as caught:
        vt.load_model("run/best.pt", model=other)
    assert str(caught.value) == (
        "checkpoint 'run/best.pt' was saved from a model built by the factory 'my_models:tiny' but this "
        "model was built by 'my_models:other'; build it with 'my_models:tiny'"
    )
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))  # unchanged
    same = vt.replace_classifier(vt.freeze_features(parse_arch("my_models:tiny").build()), 2)
    assert vt.load_model("run/best.pt", model=same).class_names == ["cats", "dogs"]


def test_two_runs_started_at_once_never_share_the_default_run_folder(
    folders: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import vggtransfer._cli_train as cli_train

    monkeypatch.chdir(folders)
    scan = cli_train.read_train_and_val

    def another_run_starts_meanwhile(args: object) -> object:
        # The other process chose runs/train too, and created it while this one scanned.
        (folders / "runs" / "train").mkdir(parents=True)
        (folders / "runs" / "train" / "best.pt").write_bytes(b"the other run's")
        return scan(args)  # type: ignore[arg-type]

    monkeypatch.setattr(cli_train, "read_train_and_val", another_run_starts_meanwhile)
    status, printed, err = _run(
        ["train", "pets", "--arch", "resnet18", "--weights", "none", *TRAIN_TINY], capsys
    )
    assert status == 0, err
    assert "run folder runs/train2:" in printed
    assert [p.name for p in (folders / "runs" / "train").iterdir()] == ["best.pt"]
    assert (folders / "runs" / "train" / "best.pt").read_bytes() == b"the other run's"
    assert {p.name for p in (folders / "runs" / "train2").iterdir()} == RUN_FILES


def test_train_under_torchrun_says_to_use_the_library(
    folders: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(folders)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each of its processes
    status, _, err = _run(["train", "pets", "--arch", "resnet18", "--weights", "none"], capsys)
    assert (status, err) == (
        2,
        "vggtransfer train: error: vggtransfer train runs in one process; under torchrun, train with "
        "vt.Trainer from a script (examples/dogs_vs_cats.py runs unchanged there, see docs/scaling.md)\n",
    )
    assert not (folders / "runs").exists()


def test_default_weights_come_from_torchvisions_cache_and_offline_says_what_to_pass(
    folders: Path, torch_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import urllib.error

    from torchvision.models import ResNet18_Weights, resnet18

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.chdir(folders)
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    argv = ["train", "pets", "--arch", "resnet18", *TRAIN_TINY]
    status, _, err = _run([*argv, "--out", "offline"], capsys)
    assert status == 1 and err.startswith(
        "vggtransfer train: failed: WeightsNotAvailableError: could not download"
    )
    assert err.endswith("With vggtransfer train: --weights /path/to/the/file.pth, or --weights none.\n")
    assert not (folders / "offline").exists()
    torch.manual_seed(3)
    pretrained = resnet18().state_dict()  # stand-in ImageNet weights, under torchvision's file name
    cached = vt.cached_weights_path(ResNet18_Weights.DEFAULT)
    assert list(cached.parent.iterdir()) == []  # the failed download left nothing behind
    torch.save(pretrained, cached)
    for weights, recorded in ((None, "ResNet18_Weights.IMAGENET1K_V1"), (str(cached), f"file:{cached}")):
        out = f"run-{len(recorded)}"
        assert _run([*argv, "--out", out, *(["--weights", weights] if weights else [])], capsys)[0] == 0
        best = torch.load(folders / out / "best.pt", weights_only=True)
        assert best["build"]["weights"] == recorded
        assert torch.equal(best["model"]["conv1.weight"], pretrained["conv1.weight"])  # frozen: as loaded


def test_library_warnings_are_one_line_in_option_words_and_help_returns_0(
    factory_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import vggtransfer._runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)  # as on this 2-core AVX2 machine
    status, _, err = _run(
        ["train", "pets", "--arch", "my_models:tiny", *TRAIN_TINY, "--precision", "bf16"], capsys
    )
    assert status == 0
    assert err.splitlines()[0].startswith(
        "vggtransfer train: warning: --precision 'bf16' on a CPU without native bf16 arithmetic"
    )
    assert "UserWarning" not in err and "HINT: use --precision 'fp32'" in err
    assert main(["train", "--help"]) == 0 and "(default: vgg16_bn)" in " ".join(
        capsys.readouterr().out.split()
    )


def test_a_factory_leaves_sys_path_and_other_modules_as_they_were(
    factory_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import sys

    before = list(sys.path)
    assert _run(["train", "pets", "--arch", "my_models:tiny", *TRAIN_TINY], capsys)[0] == 0
    assert sys.path == before and os.getcwd() not in sys.path  # a local onnx.py cannot shadow onnx later
    (factory_folder / "json.py").write_text("def build():\n    raise SystemExit('never run')\n")
    status, _, err = _run(["train", "pets", "--arch", "json.py:build", *TRAIN_TINY], capsys)
    assert (status, err) == (
        2,
        "vggtransfer train: error: --arch 'json.py:build': a module named 'json' is already imported, so "
        "the file cannot be imported under that name; rename 'json.py'\n",
    )
    import json

    assert sys.modules["json"] is json and hasattr(json, "dumps")
