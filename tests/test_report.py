"""Per-sample evaluation and the report files: F1, balanced accuracy, CSV, PNGs, report.md."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Subset, TensorDataset
from torchvision.datasets import ImageFolder

import vggtransfer as vt
from helpers import toy, trainer
from photos import class_folders
from vggtransfer._metrics import ConfusionMatrix

NAMES = ["a", "b", "c"]


class Oracle(nn.Module):
    """Its logits are the image's per-channel means: each test sample says what it is predicted as."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.classifier = nn.Linear(3, 3)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.eye(3))
            self.classifier.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.mean(dim=(2, 3)))


def scripted(pairs: list[tuple[int, int]], margin: float = 2.0) -> TensorDataset:
    """One 4x4 image per (true, predicted) pair, predicted by :class:`Oracle` with that margin."""
    logits = torch.zeros(len(pairs), 3)
    for row, (_, predicted) in enumerate(pairs):
        logits[row, predicted] = margin + 0.1 * row  # distinct losses: a defined order
    images = logits.view(-1, 3, 1, 1).expand(-1, 3, 4, 4).clone()
    return TensorDataset(images, torch.tensor([true for true, _ in pairs]))


def oracle_trainer() -> vt.Trainer:
    return vt.Trainer(Oracle(), device="cpu", seed=0, progress=False, class_names=NAMES)


# 8 of class a (6 right, 1 as b, 1 as c), 2 of b (1 right, 1 as a), 2 of c (both right): imbalanced 4:1.
PAIRS = [(0, 0)] * 6 + [(0, 1), (0, 2), (1, 1), (1, 0), (2, 2), (2, 2)]


def test_evaluate_adds_f1_and_balanced_accuracy_by_hand() -> None:
    result = oracle_trainer().evaluate(scripted(PAIRS), batch_size=5, num_workers=0)
    # a: tp 6, predicted 7, actual 8; b: tp 1, predicted 2, actual 2; c: tp 2, predicted 3, actual 2.
    expected = {"a": (6 / 7, 6 / 8), "b": (1 / 2, 1 / 2), "c": (2 / 3, 1.0)}
    for name, (precision, recall) in expected.items():
        entry = result["per_class"][name]
        assert entry["precision"] == pytest.approx(precision) and entry["recall"] == pytest.approx(recall)
        assert entry["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert result["balanced_accuracy"] == pytest.approx((6 / 8 + 1 / 2 + 1) / 3)
    assert result["accuracy"] == pytest.approx(9 / 12)
    assert set(result) == {
        "loss",
        "accuracy",
        "balanced_accuracy",
        "count",
        "class_names",
        "confusion_matrix",
        "per_class",
    }


def test_balanced_accuracy_leaves_out_classes_without_samples() -> None:
    confusion = ConfusionMatrix(3, torch.device("cpu"))
    logits = torch.eye(3)[[0, 0, 1, 0]]
    confusion.update(logits, torch.tensor([0, 0, 1, 1]))  # no sample of class c
    report = confusion.report(NAMES)
    assert report["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_samples_hold_probabilities_and_losses() -> None:
    evaluation = vt.evaluate_samples(oracle_trainer(), scripted(PAIRS), batch_size=5)
    sample = evaluation.samples[7]  # true a, predicted c with logit 2.7
    p = math.exp(2.7) / (math.exp(2.7) + 2)
    assert (sample.index, sample.path, sample.true, sample.predicted) == (7, None, 0, 2)
    assert sample.probability == pytest.approx(p) and sample.true_probability == pytest.approx(
        1 / (math.exp(2.7) + 2)
    )
    assert sample.loss == pytest.approx(-math.log(sample.true_probability))
    metrics = oracle_trainer().evaluate(scripted(PAIRS), num_workers=0)
    for key in ("accuracy", "balanced_accuracy", "confusion_matrix", "per_class", "count"):
        assert evaluation.metrics[key] == metrics[key]
    assert evaluation.metrics["loss"] == pytest.approx(metrics["loss"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_misclassified_rows_are_the_errors_by_loss(tmp_path: Path) -> None:
    evaluation = vt.write_report(oracle_trainer(), scripted(PAIRS), tmp_path)
    rows = read_csv(tmp_path / "misclassified.csv")
    count, accuracy = evaluation.metrics["count"], evaluation.metrics["accuracy"]
    assert len(rows) == round(count * (1 - accuracy)) == 3
    assert (tmp_path / "misclassified.csv").read_text().splitlines()[0] == "path,true,predicted,probability"
    # Losses grow with the wrong logit, i.e. with the row: the last error (b as a) first.
    assert [(r["path"], r["true"], r["predicted"]) for r in rows] == [
        ("", "b", "a"),
        ("", "a", "c"),
        ("", "a", "b"),
    ]
    losses = [s.loss for s in evaluation.errors]
    assert losses == sorted(losses, reverse=True)
    assert float(rows[0]["probability"]) == pytest.approx(evaluation.errors[0].probability, abs=1e-6)


def test_report_md_has_the_tables_and_warns_beyond_three_to_one(tmp_path: Path) -> None:
    vt.write_report(
        oracle_trainer(),
        scripted(PAIRS),
        tmp_path,
        model="Oracle",
        timings={"fit": 1.25},
        command="python run.py",
    )
    text = (tmp_path / "report.md").read_text()
    assert "| class | precision | recall | F1 | support |" in text
    assert "| a | 0.8571 | 0.7500 | 0.8000 | 8 |" in text
    assert "- balanced accuracy: 0.7500 (mean recall over the classes present)" in text
    assert "| **a** | 6 | 1 | 1 |" in text and "| true \\ predicted | a | b | c |" in text
    assert "**Warning: the classes are imbalanced beyond 3:1** ('a' has 8 samples, 'b' 2: 4.0:1)." in text
    assert (
        'or weighting the loss: `Trainer(class_weights="balanced")` '
        "(`vggtransfer train --class-weights balanced`)." in text
    )
    assert "## Model\n\nOracle" in text and "| fit | 1.2 |" in text and "```sh\npython run.py\n```" in text
    three_to_one = [(0, 0)] * 6 + [(1, 1), (1, 1), (2, 2), (2, 2)]
    vt.write_report(oracle_trainer(), scripted(three_to_one), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "Warning" not in text and "The classes are balanced within 3:1." in text
    assert "## Model" not in text and "## Timings" not in text and "## Reproduce" not in text


def test_pngs_are_images_of_a_sensible_size(tmp_path: Path) -> None:
    paths = vt.evaluate_samples(oracle_trainer(), scripted(PAIRS)).write_report(tmp_path, top=2)
    assert sorted(paths) == ["confusion_matrix.png", "errors.png", "misclassified.csv", "report.md"]
    for name, smallest in (("confusion_matrix.png", (600, 400)), ("errors.png", (400, 300))):
        with Image.open(tmp_path / name) as image:
            image.verify()
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
            assert smallest[0] <= image.width <= 4000 and smallest[1] <= image.height <= 4000, image.size


def test_no_errors_gives_a_note_and_a_header_only_csv(tmp_path: Path) -> None:
    vt.write_report(oracle_trainer(), scripted([(0, 0), (1, 1), (2, 2)]), tmp_path)
    assert (tmp_path / "misclassified.csv").read_text() == "path,true,predicted,probability\n"
    with Image.open(tmp_path / "errors.png") as image:
        assert image.size == (600, 200)
    assert (
        "The 0 worst are in errors.png, all 0 in misclassified.csv." in (tmp_path / "report.md").read_text()
    )


def test_paths_through_subset_and_gallery_from_files(tmp_path: Path) -> None:
    class_folders(tmp_path / "photos", {"cat": 3, "dog": 3})
    folder = ImageFolder(str(tmp_path / "photos"), transform=vt.imagenet_transform(resize=40, size=32))
    subset = Subset(folder, [5, 0, 3, 4])
    evaluation = vt.write_report(trainer(toy(), class_names=["cat", "dog"]), subset, tmp_path / "out", top=3)
    assert [s.path for s in evaluation.samples] == [folder.samples[i][0] for i in (5, 0, 3, 4)]
    assert [s.true for s in evaluation.samples] == [1, 0, 1, 1]
    rows = read_csv(tmp_path / "out" / "misclassified.csv")
    assert {r["path"] for r in rows} == {s.path for s in evaluation.errors}
    assert rows and all(Path(r["path"]).is_file() for r in rows)


def test_files_replaced_and_other_files_untouched(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_bytes(b"mine")
    (tmp_path / "report.md").write_text("old")
    vt.write_report(oracle_trainer(), scripted(PAIRS), tmp_path)
    assert (tmp_path / "notes.txt").read_bytes() == b"mine"
    assert (tmp_path / "report.md").read_text().startswith("# Evaluation report")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confusion_matrix.png", "errors.png", "misclassified.csv", "notes.txt", "report.md",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"top": 0}, ValueError, "write_report: expected top to be a positive int (1 or more) but got 0"),
        ({"top": 101}, ValueError, "write_report: expected top to be at most 100 but got 101"),
        ({"scan": "x"}, TypeError, "write_report: expected scan to be a vggtransfer.data.ScanReport (from scan_images) or None but got str"),
        ({"model": 3}, TypeError, "write_report: expected model to be a str or None but got int"),
        ({"timings": {"fit": "1s"}}, TypeError, "write_report: expected timings to be a dict of phase name (str) to seconds (a finite number), e.g. {'fit': 12.5}, but got {'fit': '1s'}"),
        ({"batch_size": 0}, ValueError, "evaluate_samples: expected batch_size to be a positive int (1 or more) but got 0"),
    ],
)  # fmt: skip
def test_argument_checks(tmp_path: Path, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error) as caught:
        vt.write_report(oracle_trainer(), scripted(PAIRS), tmp_path / "out", **kwargs)
    assert str(caught.value) == message
    assert not (tmp_path / "out").exists()


def test_refusals(tmp_path: Path) -> None:
    data = scripted(PAIRS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError) as caught:
        vt.write_report(oracle_trainer(), data, tmp_path / "file")
    assert (
        str(caught.value)
        == f"write_report: expected folder to be a directory but {str(tmp_path / 'file')!r} is a file; give a folder"
    )
    with pytest.raises(TypeError) as caught:
        vt.evaluate_samples("trainer", data)  # type: ignore[arg-type]
    assert str(caught.value) == "evaluate_samples: expected a vggtransfer Trainer but got str"
    with pytest.raises(ValueError) as caught:
        vt.evaluate_samples(oracle_trainer(), torch.utils.data.DataLoader(data))
    assert str(caught.value).startswith(
        "evaluate_samples: expected a Dataset but got a DataLoader; pass its dataset"
    )
    with pytest.raises(ValueError) as caught:
        vt.evaluate_samples(oracle_trainer(), TensorDataset(torch.zeros(2, 3, 4, 4), torch.tensor([0, 3])))
    assert str(caught.value) == (
        "evaluate_samples: expected labels in 0..2 (the model has 3 outputs) but got 3; "
        "check the dataset's labels against the model's head"
    )


def test_report_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        vt.evaluate_samples(oracle_trainer(), scripted(PAIRS)).write_report(tmp_path, top=2)
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    # mkstemp's 0600 would keep the report from the rest of the team
    assert modes == dict.fromkeys(
        ["confusion_matrix.png", "errors.png", "misclassified.csv", "report.md"], 0o644
    )


def test_a_file_name_that_is_not_utf8_keeps_its_bytes_in_the_csv(tmp_path: Path) -> None:
    data = scripted(PAIRS)
    name = os.fsdecode(b"b\xfe.jpg")  # what the OS hands over for a name that is not UTF-8
    data.samples = [(f"photos/{name}", true) for true, _ in PAIRS]  # type: ignore[attr-defined]
    vt.write_report(oracle_trainer(), data, tmp_path, batch_size=4, num_workers=0)
    raw = (tmp_path / "misclassified.csv").read_bytes()
    assert b"photos/b\xfe.jpg" in raw  # the path opens again: os.fsencode of the CSV's text
    (tmp_path / "report.md").read_text(encoding="utf-8")  # still valid UTF-8 for viewers
