"""``vggtransfer predict``: classify image files, folders and globs with a checkpoint; write a CSV."""

from __future__ import annotations

import argparse
import csv
import glob
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ._checkpoint_file import atomic_write
from ._cli_common import (
    UsageError,
    add_arch,
    check_positive,
    check_runtime,
    free_file,
    make_trainer,
    open_checkpoint,
)
from ._heads import output_count
from ._images import to_rgb
from ._progress import task_bar
from ._sources import default_workers
from ._submission import positive_column, submission_csv
from ._transforms import ImageTransform

__all__ = ["IMAGE_SUFFIXES", "add_parser", "collect_images"]

#: Image file suffixes that ``predict`` collects from folders and globs.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def add_parser(commands: Any) -> None:
    """Register ``predict`` with its options."""
    predict = commands.add_parser("predict", help="classify images with a checkpoint; write a CSV")
    predict.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    add_arch(predict)
    predict.add_argument("--top-k", type=int, default=1, help="also write the k most probable classes")
    predict.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="the CSV to write (default: predictions.csv, or predictions2.csv, ...)",
    )
    predict.add_argument("--tta", action="store_true", help="average each image with its mirror image")
    predict.add_argument(
        "--kaggle-submission",
        type=Path,
        metavar="FILE",
        help="also write Kaggle's id,label for one test folder",
    )
    predict.add_argument("--batch-size", type=int, default=32, help="images per step")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    predict.set_defaults(run=_predict)


def collect_images(patterns: Sequence[str]) -> list[Path]:
    """The image files named by ``patterns``: files, folders (recursive, sorted) and globs.

    Raises:
        UsageError: a pattern names nothing, or nothing at all was found.
    """
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            if not matches:
                raise UsageError(f"PATH {pattern!r} matches no file")
            found += [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            raise UsageError(f"PATH {pattern!r} is not a file, a folder or a glob that matches")
    # The same file named twice (a/x.jpg and a/../a/x.jpg, or a link) is predicted once.
    unique = list({path.resolve(): path for path in reversed(found)}.values())[::-1]
    if not unique:
        raise UsageError(f"found no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(patterns)}")
    return unique


def _predict(args: argparse.Namespace) -> int:
    check_positive(args.top_k, "--top-k")
    check_positive(args.batch_size, "--batch-size")
    if args.kaggle_submission is not None and not (len(args.paths) == 1 and Path(args.paths[0]).is_dir()):
        raise UsageError("--kaggle-submission needs PATH to be one folder: Kaggle's test1/")
    check_runtime(args.device, "auto")
    files = collect_images(args.paths)
    # Named, the file is replaced (atomically); by default a new one is found, as train's run folders are.
    args.csv = args.csv if args.csv is not None else free_file(Path("predictions.csv"))
    _check_outputs(args, files)
    model, class_names, transform = open_checkpoint(args.checkpoint, args.arch)
    names = class_names or [str(i) for i in range(_outputs(model))]
    if args.top_k > len(names):
        raise UsageError(f"expected --top-k to be at most the {len(names)} classes but got {args.top_k}")
    trainer = make_trainer(model, device=args.device, class_names=names, transform=transform, progress=False)
    dog = _dog_class(names) if args.kaggle_submission is not None else None
    if dog is not None:
        _check_kaggle_ids(files)
    rows, skipped = _rows(trainer, _Readable(files, transform), args)
    for path, reason in skipped:
        print(_shown(f"skipped {path}: {reason}"))
    if not rows:  # an empty CSV must not replace the user's last one
        raise UsageError(
            _shown(f"none of the {len(files)} files could be read as an image (see skipped above); "
            f"expected JPEG, PNG, ... images; nothing was written")
        )  # fmt: skip
    _write(args.csv, _csv(rows, args.top_k))
    print(f"predicted {len(rows)} images ({len(skipped)} skipped); wrote {args.csv}")
    if dog is not None:
        # From the predictions just made: each image is read and classified once.
        _write(
            args.kaggle_submission,
            submission_csv([(Path(path).stem, dict(ranked)[dog]) for path, ranked in rows]),
        )
        print(f"wrote the Kaggle submission {args.kaggle_submission} ({len(rows)} rows, label = P({dog}))")
        if skipped:  # Kaggle refuses a submission with ids missing: say so, and fail
            print(
                f"vggtransfer predict: failed: the submission lacks the {len(skipped)} ids of the files "
                f"skipped above; Kaggle will refuse it",
                file=sys.stderr,
            )
            return 1
    return 0


def _check_outputs(args: argparse.Namespace, files: list[Path]) -> None:
    """--csv and --kaggle-submission name new or replaceable files: never an input, nor each other."""
    inputs = {path.resolve() for path in files}
    outputs = [("--csv", args.csv), ("--kaggle-submission", args.kaggle_submission)]
    for option, target in outputs:
        if target is None:
            continue
        found = (
            "is a folder" if target.is_dir()
            else "is the checkpoint" if target.resolve() == args.checkpoint.resolve()
            else "is one of the images to predict" if target.resolve() in inputs
            else "is in a folder that is a file" if target.parent.exists() and not target.parent.is_dir()
            else None
        )  # fmt: skip
        if found is not None:
            raise UsageError(f"{option} {str(target)!r} {found}; expected a new or replaceable .csv file")
    if args.kaggle_submission is not None and args.kaggle_submission.resolve() == args.csv.resolve():
        raise UsageError(
            f"--kaggle-submission {str(args.kaggle_submission)!r} is the --csv file too; expected two files"
        )


def _write(path: Path, text: str) -> None:
    """Write a CSV atomically; a file name that is not UTF-8 keeps its bytes, so that it opens again."""
    data = text.encode("utf-8", "surrogateescape")
    atomic_write(path, lambda raw: raw.write(data), "a CSV file", lambda: len(data))


def _shown(text: str) -> str:
    """``text`` printable on any terminal: a file name's bytes that are not UTF-8 become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _dog_class(names: list[str]) -> str:
    """The class whose probability Kaggle's Dogs vs Cats wants, by write_kaggle_submission's rule."""
    try:
        return names[positive_column(names, "dog")]
    except ValueError as error:
        raise UsageError(
            f"--kaggle-submission {str(error).removeprefix('write_kaggle_submission: ').split('; pass')[0]}"
        ) from None


def _check_kaggle_ids(files: list[Path]) -> None:
    """One file per id, as in Kaggle's test1/ (1.jpg, 2.jpg, ...): else two rows would share an id."""
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise UsageError(
                f"--kaggle-submission: {str(seen[path.stem])!r} and {str(path)!r} have the same id "
                f"{path.stem!r}; expected Kaggle's test1/ folder, one file per id"
            )
        seen[path.stem] = path


class _Readable(Dataset[tuple[torch.Tensor, str]]):
    """Image files through ``transform``, read once, by loader workers; ``(image, "")`` each.

    A file that cannot be decoded gives a blank image and the reason instead of failing its batch,
    so that one broken file among thousands is named and skipped rather than fatal.
    """

    def __init__(self, files: list[Path], transform: ImageTransform) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            with Image.open(self.files[index]) as image:
                return self.transform(to_rgb(image)), ""
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            size = self.transform.size
            return torch.zeros(3, size, size), f"cannot be read ({type(error).__name__}: {error})"


def _outputs(model: Any) -> int:
    return output_count(model, "vggtransfer predict")


def _rows(
    trainer: Any, images: _Readable, args: argparse.Namespace
) -> tuple[list[tuple[str, list[tuple[str, float]]]], list[tuple[Path, str]]]:
    """``(path, [(class, probability), ...] most probable first)`` per readable image; the skipped."""
    loader = DataLoader(images, batch_size=args.batch_size, num_workers=min(default_workers(), 8))
    rows, skipped = [], []
    files = iter(images.files)  # the loader keeps the order: one file per prediction
    with task_bar(len(images), "predict") as advance:
        for batch, reasons in loader:
            for prediction, reason in zip(trainer.predict(batch, tta=args.tta), reasons, strict=True):
                path = next(files)
                if reason:
                    skipped.append((path, reason))
                else:
                    rows.append(
                        (str(path), sorted(prediction.probabilities.items(), key=lambda item: -item[1]))
                    )
            advance(len(reasons))
    return rows, skipped


def _csv(rows: list[tuple[str, list[tuple[str, float]]]], top_k: int) -> str:
    header = ["path", "label", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"label_{rank}", f"probability_{rank}"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for path, ranked in rows:
        writer.writerow([path, *(value for label, p in ranked[:top_k] for value in (label, f"{p:.6f}"))])
    return text.getvalue()
