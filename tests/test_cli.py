"""The vggtransfer command: scan, predict and compare, their outputs, and every error's message and status.

train, evaluate and export are in tests/test_cli_train.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import photos
import vggtransfer as vt
from vggtransfer._cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 (random weights, rebuildable from its record) with a cat/dog head, 32 px; read only."""
    tmp_path = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    model = vt.replace_classifier(vt.create_model("resnet18", weights=None), 2)
    trainer = vt.Trainer(
        model,
        device="cpu",
        progress=False,
        class_names=["cat", "dog"],
        transform=vt.imagenet_transform(size=32),
    )
    return trainer.save_checkpoint(tmp_path / "model.pt", training_state=False)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Two class folders of photos and one broken file."""
    photos.class_folders(tmp_path / "images", {"cats": 3, "dogs": 2})
    (tmp_path / "images" / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return tmp_path / "images"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_predict_writes_one_row_per_image_with_top_k(
    checkpoint: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "predictions.csv"
    single = next((images / "cats").iterdir())
    argv = ["predict", str(checkpoint), str(images / "cats"), str(images / "dogs" / "*.jpg"), str(single)]
    status, printed, _ = _run([*argv, "--top-k", "2", "--csv", str(out)], capsys)
    assert status == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["path", "label", "probability", "label_2", "probability_2"]
    assert len(rows) == 1 + 5  # 3 cats and 2 dogs; the file named twice once; the broken one skipped
    assert "skipped " + str(images / "dogs" / "broken.jpg") in printed
    assert printed.strip().splitlines()[-1] == f"predicted 5 images (1 skipped); wrote {out}"
    model, names, transform = vt.load_model(checkpoint)
    reference = vt.Trainer(model, device="cpu", progress=False, class_names=names, transform=transform)
    for path, label, p, label_2, p_2 in rows[1:]:
        expected = reference.predict(path)
        assert label == expected.label and {label, label_2} == {"cat", "dog"}
        assert float(p) == pytest.approx(expected.probabilities[label], abs=1e-5)
        assert float(p) >= float(p_2) and float(p) + float(p_2) == pytest.approx(1, abs=1e-5)


def test_predict_with_tta_averages_each_image_with_its_mirror(
    checkpoint: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tta.csv"
    assert (
        _run(["predict", str(checkpoint), str(images / "cats"), "--tta", "--csv", str(out)], capsys)[0] == 0
    )
    model, names, transform = vt.load_model(checkpoint)
    reference = vt.Trainer(model, device="cpu", progress=False, class_names=names, transform=transform)
    for path, label, p in list(csv.reader(out.open()))[1:]:
        assert float(p) == pytest.approx(reference.predict(path, tta=True).probabilities[label], abs=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict"], "vggtransfer predict: error: the following arguments are required: CHECKPOINT, PATH"),
        (
            ["predict", "{missing}", "{images}"],
            "vggtransfer predict: error: CHECKPOINT '{missing}' is not a file",
        ),
        (
            ["predict", "{checkpoint}", "{tmp}/nothing"],
            "vggtransfer predict: error: PATH '{tmp}/nothing' is not a file, a folder or a glob that matches",
        ),
        (
            ["predict", "{checkpoint}", "{tmp}/*.png"],
            "vggtransfer predict: error: PATH '{tmp}/*.png' matches no file",
        ),
        (
            ["predict", "{checkpoint}", "{images}", "--top-k", "3"],
            "vggtransfer predict: error: expected --top-k to be at most the 2 classes but got 3",
        ),
        (
            ["predict", "{checkpoint}", "{images}", "--top-k", "0"],
            "vggtransfer predict: error: expected --top-k to be 1 or more but got 0",
        ),
        (
            ["predict", "{notckpt}", "{images}"],
            "vggtransfer predict: error: '{notckpt}' is not a vggtransfer checkpoint: it is a text file",
        ),
        (["scan", "{missing}"], "vggtransfer scan: error: DATA '{missing}' is not a folder"),
        (
            ["scan", "{images}", "--workers", "0"],
            "vggtransfer scan: error: expected --workers to be 1 or more but got 0",
        ),
        (
            ["compare", "{images}", "--arch", "squeezenet1_1", "--weights", "none", "--epochs", "0"],
            "vggtransfer compare: error: expected --epochs to be a positive int (1 or more) but got 0",
        ),
        (
            ["compare", "{images}", "--arch", "resnet18", "resnet18"],
            "vggtransfer compare: error: expected distinct --arch values but got resnet18 resnet18",
        ),
        (
            ["compare", "{images}", "--arch", "resnet18", "--weights", "none", "--out", "{images}/cmp"],
            "vggtransfer compare: error: --out '{images}/cmp' is inside DATA '{images}'; expected a folder "
            "outside the images, so that the files written never mix with them (e.g. runs/...)",
        ),
        (
            [
                "compare",
                "{images}",
                "--arch",
                "resnet18",
                "--weights",
                "none",
                "--out",
                "{tmp}/predictions.csv",
            ],
            "vggtransfer compare: error: --out '{tmp}/predictions.csv' exists and is not an empty folder; "
            "a run never overwrites another",
        ),
        (
            ["predict", "{checkpoint}", "{images}", "--device", "gpu"],
            "vggtransfer predict: error: expected --device to be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a "
            "torch.device but got 'gpu'",
        ),
        (
            ["fly", "x"],
            "vggtransfer: error: argument COMMAND: invalid choice: 'fly'",  # then the choices, quoted per Python version
        ),
    ],
)
def test_usage_errors_print_one_line_and_exit_2(
    argv: list[str],
    message: str,
    checkpoint: Path,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "predictions.csv").write_text("mine\n")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    names = {
        "missing": str(tmp_path / "missing"), "images": str(images), "checkpoint": str(checkpoint),
        "tmp": str(tmp_path), "notckpt": str(tmp_path / "notes.pt"),
    }  # fmt: skip
    status, _, err = _run(
        [part.format(**names) for part in argv]
        + ["--csv", str(tmp_path / "predictions.csv")] * (argv[0] == "predict" and len(argv) > 1),
        capsys,
    )
    assert status == 2
    assert err.count("\n") == 1 and err.startswith(message.format(**names))
    assert "Traceback" not in err
    assert (tmp_path / "predictions.csv").read_text() == "mine\n"  # nothing written


def test_scan_lists_the_bad_files(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, printed, _ = _run(["scan", str(images)], capsys)
    assert status == 0
    assert printed.splitlines()[0] == "5 good images, 1 bad files"
    assert str(images / "dogs" / "broken.jpg") in printed


def test_python_dash_m_runs_the_same_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vggtransfer", "scan", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr == f"vggtransfer scan: error: DATA {str(tmp_path / 'missing')!r} is not a folder\n"


def test_predict_writes_a_kaggle_submission_for_a_test_folder(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos.kaggle_test(tmp_path / "test1", [photos.CAT, photos.DOG, photos.DOG])
    argv = ["predict", str(checkpoint), str(tmp_path / "test1"), "--csv", str(tmp_path / "p.csv")]
    status, printed, _ = _run([*argv, "--kaggle-submission", str(tmp_path / "submission.csv")], capsys)
    assert status == 0
    rows = list(csv.reader((tmp_path / "submission.csv").open()))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == ["1", "2", "3"]
    predicted = {
        Path(r[0]).stem: float(r[2]) if r[1] == "dog" else 1 - float(r[2])
        for r in list(csv.reader((tmp_path / "p.csv").open()))[1:]
    }
    assert all(float(p) == pytest.approx(predicted[i], abs=2e-6) for i, p in rows[1:])
    assert printed.strip().splitlines()[-1] == (
        f"wrote the Kaggle submission {tmp_path / 'submission.csv'} (3 rows, label = P(dog))"
    )
    two = ["predict", str(checkpoint), str(tmp_path / "test1"), str(tmp_path / "test1" / "1.jpg")]
    status, _, err = _run([*two, "--kaggle-submission", str(tmp_path / "s.csv")], capsys)
    assert status == 2 and err == (
        "vggtransfer predict: error: --kaggle-submission needs PATH to be one folder: Kaggle's test1/\n"
    )


def test_compare_ranks_backbones_into_numbered_run_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VGGTRANSFER_CACHE", str(tmp_path / "cache"))
    photos.class_folders(tmp_path / "pets", {"cats": 5, "dogs": 5})
    argv = ["compare", "pets", "--arch", "squeezenet1_1", "shufflenet_v2_x0_5", "--weights", "none"]
    argv += ["--epochs", "2", "--batch-size", "4", "--device", "cpu"]
    status, printed, _ = _run(argv, capsys)
    assert status == 0
    assert printed.strip().splitlines()[-1] == (
        f"wrote {Path('runs/compare/comparison.md')}, comparison.json, comparison.png, best.pt"
    )
    report = json.loads((tmp_path / "runs" / "compare" / "comparison.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["squeezenet1_1", "shufflenet_v2_x0_5"]
    assert all(row["error"] is None and row["cache"]["fit(train)"] == "on" for row in report["rows"])
    assert _run(argv, capsys)[0] == 0  # a second run: its own folder, the features from disk
    again = json.loads((tmp_path / "runs" / "compare2" / "comparison.json").read_text())
    assert all(row["cache"]["fit(train)"] == "on (from disk)" for row in again["rows"])
    status, _, err = _run(["compare", "pets", "--arch", "resnet81", "--weights", "none"], capsys)
    assert status == 2 and err.startswith(
        "vggtransfer compare: error: --arch: unknown architecture 'resnet81'; did you mean 'resnet18'"
    )


@pytest.mark.parametrize(
    ("option", "target", "found"),
    [
        ("--csv", "{checkpoint}", "is the checkpoint"),
        ("--csv", "{images}/cats/cats-0.jpg", "is one of the images to predict"),
        ("--csv", "{images}", "is a folder"),
        ("--csv", "{tmp}/notes.txt/p.csv", "is in a folder that is a file"),
        ("--kaggle-submission", "{tmp}/predictions.csv", "is the --csv file too"),
    ],
)
def test_predict_never_writes_over_its_inputs(
    option: str, target: str, found: str, checkpoint: Path, images: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    (tmp_path / "notes.txt").write_text("mine")
    files = [checkpoint, *sorted(images.rglob("*")), tmp_path / "notes.txt"]
    before = {path: path.read_bytes() for path in files if path.is_file()}
    target = target.format(checkpoint=checkpoint, images=images, tmp=tmp_path)
    argv = ["predict", str(checkpoint), str(images), "--csv", str(tmp_path / "predictions.csv")]
    status, _, err = _run([*argv, option, target], capsys)
    expected = "expected two files" if "--csv" in found else "expected a new or replaceable .csv file"
    assert (status, err) == (2, f"vggtransfer predict: error: {option} {target!r} {found}; {expected}\n")
    assert {path: path.read_bytes() for path in before} == before
    assert not (tmp_path / "predictions.csv").exists()


def test_predict_names_a_file_once_and_keeps_non_utf8_names(checkpoint: Path, tmp_path: Path) -> None:
    photos.class_folders(tmp_path / "in", {"cats": 1})
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8, kept as surrogates
    (tmp_path / "in" / "cats" / "cats-0.jpg").rename(tmp_path / "in" / name)
    (tmp_path / "in" / os.fsdecode(b"\xff.jpg")).write_bytes(b"broken")
    twice = str(tmp_path / "in" / ".." / "in" / name)
    result = subprocess.run(
        [sys.executable, "-m", "vggtransfer", "predict", str(checkpoint), str(tmp_path / "in"), twice],
        capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[-1] == "predicted 1 images (1 skipped); wrote predictions.csv"
    assert (
        (tmp_path / "predictions.csv")
        .read_bytes()
        .splitlines()[1]
        .startswith(os.fsencode(tmp_path / "in") + b"/caf\xe9.jpg,")
    )


def test_predict_with_no_readable_image_keeps_the_last_csv(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"")
    (tmp_path / "in" / "b.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "predictions.csv").write_text("mine\n")
    argv = ["predict", str(checkpoint), str(tmp_path / "in"), "--csv", str(tmp_path / "predictions.csv")]
    status, printed, err = _run(argv, capsys)
    assert status == 2 and err == (
        "vggtransfer predict: error: none of the 2 files could be read as an image (see skipped above); "
        "expected JPEG, PNG, ... images; nothing was written\n"
    )
    assert printed.startswith(f"skipped {tmp_path / 'in' / 'a.jpg'}: cannot be read")
    assert (tmp_path / "predictions.csv").read_text() == "mine\n"


def test_predict_without_csv_never_replaces_an_earlier_predictions_file(
    checkpoint: Path,
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "predictions.csv").write_text("mine\n")
    status, printed, _ = _run(["predict", str(checkpoint), str(images / "cats")], capsys)
    assert (
        status == 0
        and printed.strip().splitlines()[-1] == "predicted 3 images (0 skipped); wrote predictions2.csv"
    )
    assert (tmp_path / "predictions.csv").read_text() == "mine\n"
    assert len((tmp_path / "predictions2.csv").read_text().splitlines()) == 1 + 3
    explicit = ["predict", str(checkpoint), str(images / "cats"), "--csv", "predictions.csv"]
    assert _run(explicit, capsys)[0] == 0  # named: replaced, as documented
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 1 + 3


def test_kaggle_submission_refuses_two_files_of_one_id_and_fails_when_ids_are_missing(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test1 = tmp_path / "test1"
    photos.kaggle_test(test1 / "a", [photos.CAT])
    photos.kaggle_test(test1 / "b", [photos.DOG])
    argv = ["predict", str(checkpoint), str(test1), "--csv", str(tmp_path / "p.csv")]
    status, _, err = _run([*argv, "--kaggle-submission", str(tmp_path / "s.csv")], capsys)
    assert (status, err) == (
        2,
        f"vggtransfer predict: error: --kaggle-submission: {str(test1 / 'a' / '1.jpg')!r} and "
        f"{str(test1 / 'b' / '1.jpg')!r} have the same id '1'; expected Kaggle's test1/ folder, one file per id\n",
    )
    assert not (tmp_path / "s.csv").exists()
    photos.kaggle_test(tmp_path / "t", [photos.CAT, photos.DOG])
    (tmp_path / "t" / "3.jpg").write_bytes(b"\xff\xd8 not really")
    argv = ["predict", str(checkpoint), str(tmp_path / "t"), "--csv", str(tmp_path / "p.csv")]
    status, _, err = _run([*argv, "--kaggle-submission", str(tmp_path / "s.csv")], capsys)
    assert status == 1 and err == (
        "vggtransfer predict: failed: the submission lacks the 1 ids of the files skipped above; Kaggle will "
        "refuse it\n"
    )
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 1 + 2
