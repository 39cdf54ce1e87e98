"""vt.write_kaggle_submission: Kaggle's id,label file from an unlabelled test folder."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import photos
import vggtransfer as vt
from helpers import toy


def _trainer(class_names: list[str]) -> vt.Trainer:
    return vt.Trainer(
        toy(),
        device="cpu",
        seed=0,
        progress=False,
        class_names=class_names,
        transform=vt.imagenet_transform(size=32),
    )


def test_rows_in_numeric_id_order_with_the_probability_of_a_dog(tmp_path: Path) -> None:
    labels = photos.kaggle_test(tmp_path / "test1", [photos.CAT, photos.DOG] * 6)  # ids 1..12
    (tmp_path / "test1" / "13.jpg").write_bytes(b"not a jpeg")
    t = _trainer(["cats", "dogs"])
    result = vt.write_kaggle_submission(t, tmp_path / "test1", tmp_path / "submission.csv", batch_size=5)
    rows = list(csv.reader((tmp_path / "submission.csv").open()))
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(1, 13)] == sorted(labels, key=int)
    expected = {
        str(i): t.predict(tmp_path / "test1" / f"{i}.jpg").probabilities["dogs"] for i in range(1, 13)
    }
    assert all(float(p) == pytest.approx(expected[i], abs=5e-7) for i, p in rows[1:])
    assert all(len(p.split(".")[1]) == 6 for _, p in rows[1:])
    assert (
        result.rows == 12 and result.positive_class == "dogs" and result.path == tmp_path / "submission.csv"
    )
    assert [bad.path.name for bad in result.skipped] == ["13.jpg"]


def test_the_positive_class_must_be_one_class_and_the_old_file_survives(tmp_path: Path) -> None:
    photos.kaggle_test(tmp_path / "test1", [photos.CAT, photos.DOG])
    (tmp_path / "submission.csv").write_text("id,label\n1,0.5\n")
    with pytest.raises(ValueError) as error:
        vt.write_kaggle_submission(
            _trainer(["cool", "warm"]), tmp_path / "test1", tmp_path / "submission.csv"
        )
    assert str(error.value) == (
        "write_kaggle_submission: expected exactly one class named 'dog' (or 'dogs') among the Trainer's "
        "classes ['cool', 'warm'] but found 0; pass positive_class= one of them"
    )
    result = vt.write_kaggle_submission(
        _trainer(["cool", "warm"]), tmp_path / "test1", tmp_path / "other.csv", positive_class="Warm"
    )
    assert result.positive_class == "warm"
    assert (tmp_path / "submission.csv").read_text() == "id,label\n1,0.5\n"  # untouched by the failure
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        vt.write_kaggle_submission(_trainer(["cat", "dog"]), tmp_path / "test1", tmp_path / "no" / "s.csv")
    with pytest.raises(TypeError, match="expected positive_class to be a class name such as 'dog' but got 1"):
        vt.write_kaggle_submission(
            _trainer(["cat", "dog"]), tmp_path / "test1", tmp_path / "s.csv", positive_class=1
        )  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.csv", "submission.csv", "test1"]
