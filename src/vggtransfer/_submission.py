"""Kaggle's Dogs vs Cats submission: ``id,label`` with label the probability of a dog."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._checkpoint_file import atomic_write_text
from .data import BadFile, DogsVsCats

if TYPE_CHECKING:
    from ._trainer import Trainer

__all__ = ["Submission", "positive_column", "submission_csv", "write_kaggle_submission"]


@dataclass(frozen=True)
class Submission:
    """What :func:`write_kaggle_submission` wrote.

    Attributes:
        path: The CSV file.
        rows: Images predicted, one row each.
        positive_class: The class whose probability is the ``label`` column.
        skipped: Files of the test folder that could not be read, with the reason.
    """

    path: Path
    rows: int
    positive_class: str
    skipped: list[BadFile]


def positive_column(class_names: list[str] | None, positive: str) -> int:
    """The output whose probability Kaggle wants: the one class named ``positive`` (or its plural).

    Raises:
        ValueError: no class names, or not exactly one class of that name.
    """
    if not class_names:
        raise ValueError(
            "write_kaggle_submission: the Trainer has no class names, so the dog class cannot be found; "
            "train on a labelled folder (its classes name the outputs) or pass Trainer(class_names=...)"
        )
    wanted = positive.lower()
    matches = [i for i, name in enumerate(class_names) if name.lower() in (wanted, f"{wanted}s")]
    if len(matches) != 1:
        raise ValueError(
            f"write_kaggle_submission: expected exactly one class named {positive!r} (or {positive + 's'!r}) "
            f"among the Trainer's classes {class_names} but found {len(matches)}; pass "
            f"positive_class= one of them"
        )
    return matches[0]


def _sort_key(ident: str) -> tuple[int, int, str]:
    # Kaggle's ids are numbers: 2 before 10; any other name after them, alphabetically.
    return (0, int(ident), "") if ident.isdigit() else (1, 0, ident)


def submission_csv(rows: list[tuple[str, float]]) -> str:
    """Kaggle's ``id,label`` text for ``(id, probability)`` rows, in numeric id order."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", "label"])
    writer.writerows((ident, f"{p:.6f}") for ident, p in sorted(rows, key=lambda row: _sort_key(row[0])))
    return text.getvalue()


def write_kaggle_submission(
    trainer: Trainer,
    test: str | os.PathLike[str] | DogsVsCats,
    path: str | os.PathLike[str],
    *,
    positive_class: str = "dog",
    batch_size: int = 32,
) -> Submission:
    """Predict Kaggle's unlabelled test images and write ``submission.csv`` for Dogs vs Cats.

    Every readable image of ``test`` (Kaggle's ``test1/`` folder: ``1.jpg``, ``2.jpg``, ...) is
    classified with :meth:`Trainer.predict`; the file has the header ``id,label``, one row per
    image in numeric id order, and ``label`` is the probability of ``positive_class`` with six
    decimals (Kaggle scores log loss, so probabilities, not 0/1 labels). Files that cannot be
    read are skipped and listed in the result. The CSV is written atomically: an existing file is
    replaced only once the new one is complete.

    Args:
        trainer: A trained Trainer whose class names include ``positive_class``.
        test: The test folder, or a :class:`vggtransfer.data.DogsVsCats` over it.
        path: The CSV to write; its folder must exist.
        positive_class: The class whose probability is the label (``"dog"`` matches ``dogs``
            too, in any case).
        batch_size: Images per prediction batch.

    Returns:
        A :class:`Submission`: path, row count, the class used, the skipped files.

    Raises:
        ValueError: no single class matches ``positive_class``, or the folder has no images.
        FileNotFoundError: ``test`` or the folder of ``path`` does not exist.

    Example:
        >>> import tempfile, torch, vggtransfer as vt
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> model = vt.replace_classifier(vt.create_model("resnet18", weights=None), 2)
        >>> trainer = vt.Trainer(model, device="cpu", class_names=["cat", "dog"], progress=False,
        ...                      transform=vt.imagenet_transform(size=32))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     for i in (1, 2, 10):
        ...         Image.new("RGB", (40, 30), (i * 20, 90, 40)).save(f"{folder}/{i}.jpg")
        ...     result = vt.write_kaggle_submission(trainer, folder, Path(folder) / "submission.csv")
        ...     lines = (Path(folder) / "submission.csv").read_text().splitlines()
        >>> result.rows, lines[0], [line.split(",")[0] for line in lines[1:]]
        (3, 'id,label', ['1', '2', '10'])
    """
    if not isinstance(positive_class, str) or not positive_class:
        raise TypeError(
            f"write_kaggle_submission: expected positive_class to be a class name such as 'dog' but got "
            f"{positive_class!r}"
        )
    column = positive_column(trainer.class_names, positive_class)
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"write_kaggle_submission: the folder of {str(target)!r} does not exist; create it first"
        )
    data = test if isinstance(test, DogsVsCats) else DogsVsCats(test, progress=False)
    files = [file for file, _ in data.samples]
    if not files:
        raise ValueError(f"write_kaggle_submission: found no readable images in {str(data.root)!r}")
    rows: list[tuple[str, float]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        predictions: Any = trainer.predict(chunk, batch_size=batch_size)
        for file, prediction in zip(chunk, predictions, strict=True):
            rows.append((Path(file).stem, list(prediction.probabilities.values())[column]))
    atomic_write_text(target, submission_csv(rows))
    assert trainer.class_names is not None  # _positive_column refused None
    return Submission(target, len(rows), trainer.class_names[column], list(data.bad_files))
