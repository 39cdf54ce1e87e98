"""The ``vggtransfer`` command: ``scan`` a folder, ``predict`` with a checkpoint, ``compare`` backbones.

Each subcommand is a small function over the library's public API. A mistake in what the user
typed (an unknown option, a path that does not exist, a checkpoint that does not load) prints
one line, ``vggtransfer <command>: error: ...``, and exits 2 without a traceback; a failure
while working exits 1; success exits 0. The last lines printed say where every output is.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ._checkpoint import load_model
from ._checkpoint_file import CheckpointError, atomic_write_text
from ._compare import check_model_names, compare_backbones
from ._heads import output_count
from ._images import to_rgb
from ._models import WeightsNotAvailableError, create_model
from ._sources import default_workers
from ._submission import submission_csv
from ._trainer import Trainer
from ._transforms import ImageTransform
from .data import DogsVsCats, scan_images, stratified_split

__all__ = ["UsageError", "main"]

#: Image file suffixes that ``predict`` collects from folders and globs.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class UsageError(Exception):
    """What the user typed cannot be run: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> Any:
        raise UsageError(message)


def _parser() -> _Parser:
    parser = _Parser(prog="vggtransfer", description="Transfer learning with torchvision models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    scan = commands.add_parser("scan", help="list the images of a folder that cannot be used, and why")
    scan.add_argument("data", type=Path, metavar="DATA", help="a folder of images (searched recursively)")
    scan.add_argument("--workers", type=int, default=None, help="decoding threads (default: one per core)")
    predict = commands.add_parser("predict", help="classify images with a checkpoint; write a CSV")
    predict.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    predict.add_argument("--top-k", type=int, default=1, help="also write the k most probable classes")
    predict.add_argument("--csv", type=Path, default=Path("predictions.csv"), help="the CSV to write")
    predict.add_argument("--tta", action="store_true", help="average each image with its mirror image")
    predict.add_argument(
        "--kaggle-submission",
        type=Path,
        metavar="FILE",
        help="also write Kaggle's id,label for one test folder",
    )
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--device", default="auto")
    compare = commands.add_parser(
        "compare", help="train the same head on several frozen backbones; rank them"
    )
    compare.add_argument(
        "data", type=Path, metavar="DATA", help="class folders, Kaggle's train/ or PetImages"
    )
    compare.add_argument("--arch", nargs="+", required=True, metavar="SPEC", help="torchvision or timm:NAME")
    compare.add_argument("--weights", default="DEFAULT", help="DEFAULT (pretrained) or none (random, seeded)")
    compare.add_argument(
        "--val", type=Path, default=None, help="validation folder (default: a split of DATA)"
    )
    compare.add_argument("--val-split", type=float, default=0.2, help="share of DATA for validation")
    compare.add_argument("--epochs", type=int, default=10)
    compare.add_argument("--lr", type=float, default=1e-3)
    compare.add_argument("--batch-size", type=int, default=32)
    compare.add_argument("--max-images", type=int, default=None)
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--device", default="auto")
    compare.add_argument("--out", type=Path, default=None, help="default: runs/compare, runs/compare2, ...")
    return parser


def run_folder(base: Path) -> Path:
    """``base`` if it does not exist yet, else ``base2``, ``base3``, ...: a run never overwrites another."""
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}{number}")
    return candidate


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Example:
        >>> from vggtransfer._cli import main
        >>> main(["predict"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # Errors name the subcommand, also those argparse finds before it knows which one it is.
    where = f"vggtransfer {argv[0]}" if argv and argv[0] in _COMMANDS else "vggtransfer"
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(_COMMANDS[args.command](args))
    except UsageError as error:
        print(f"{where}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vggtransfer: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a failure while working: one line, no traceback
        print(f"{where}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def _scan(args: argparse.Namespace) -> int:
    if not args.data.is_dir():
        raise UsageError(f"DATA {str(args.data)!r} is not a folder")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"expected --workers to be 1 or more but got {args.workers}")
    report = scan_images(args.data, workers=args.workers, progress=True)
    print(report)
    return 0


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
    unique = list(dict.fromkeys(found))  # the same file named twice is predicted once
    if not unique:
        raise UsageError(f"found no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(patterns)}")
    return unique


def _load(args: argparse.Namespace) -> Any:
    if not args.checkpoint.is_file():
        raise UsageError(f"CHECKPOINT {str(args.checkpoint)!r} is not a file")
    try:
        return load_model(args.checkpoint, device="cpu")
    except (CheckpointError, WeightsNotAvailableError) as error:
        raise UsageError(str(error)) from None


def _predict(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise UsageError(f"expected --top-k to be 1 or more but got {args.top_k}")
    if args.batch_size < 1:
        raise UsageError(f"expected --batch-size to be 1 or more but got {args.batch_size}")
    if args.kaggle_submission is not None and not (len(args.paths) == 1 and Path(args.paths[0]).is_dir()):
        raise UsageError("--kaggle-submission needs PATH to be one folder: Kaggle's test1/")
    files = collect_images(args.paths)
    model, class_names, transform = _load(args)
    names = class_names or [str(i) for i in range(_outputs(model))]
    if args.top_k > len(names):
        raise UsageError(f"expected --top-k to be at most the {len(names)} classes but got {args.top_k}")
    try:
        trainer = Trainer(model, device=args.device, class_names=names, transform=transform, progress=False)
    except (ValueError, TypeError) as error:  # --device names no device here
        raise UsageError(str(error).replace("Trainer: expected device", "expected --device")) from None
    dog = _dog_class(names) if args.kaggle_submission is not None else None
    rows, skipped = _rows(trainer, _Readable(files, transform), args)
    atomic_write_text(args.csv, _csv(rows, args.top_k))
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    print(f"predicted {len(rows)} images ({len(skipped)} skipped); wrote {args.csv}")
    if dog is not None:
        # From the predictions just made: each image is read and classified once.
        atomic_write_text(
            args.kaggle_submission,
            submission_csv([(Path(path).stem, dict(ranked)[dog]) for path, ranked in rows]),
        )
        print(f"wrote the Kaggle submission {args.kaggle_submission} ({len(rows)} rows, label = P({dog}))")
    return 0


def _dog_class(names: list[str]) -> str:
    """The class whose probability Kaggle's Dogs vs Cats wants, as write_kaggle_submission finds it."""
    dog = next((name for name in names if name.lower() in ("dog", "dogs")), None)
    if dog is None:
        raise UsageError(f"--kaggle-submission needs a class named dog, but the classes are {names}")
    return dog


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
    rows, skipped, start = [], [], 0
    for batch, reasons in loader:
        for prediction, reason in zip(trainer.predict(batch, tta=args.tta), reasons, strict=True):
            path = images.files[start]
            start += 1
            if reason:
                skipped.append((path, reason))
                continue
            rows.append((str(path), sorted(prediction.probabilities.items(), key=lambda item: -item[1])))
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


def _compare(args: argparse.Namespace) -> int:
    if not args.data.is_dir():
        raise UsageError(f"DATA {str(args.data)!r} is not a folder")
    if args.weights.lower() not in ("default", "none"):
        raise UsageError(f"expected --weights to be DEFAULT or none but got {args.weights!r}")
    if args.val is not None and not args.val.is_dir():
        raise UsageError(f"--val {str(args.val)!r} is not a folder")
    if not 0 < args.val_split < 1:
        raise UsageError(f"expected --val-split to be between 0 and 1 but got {args.val_split}")
    try:
        check_model_names(args.arch)
    except ValueError as error:
        raise UsageError(str(error)) from None
    train, val = _train_and_val(args)
    models: Any = (
        args.arch if args.weights.lower() == "default" else {a: _seeded(a, args.seed) for a in args.arch}
    )
    try:
        comparison = compare_backbones(
            train, val, models, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            device=args.device, max_images=args.max_images,
        )  # fmt: skip
    except (ValueError, TypeError) as error:  # an argument or the data: checked before any backbone
        raise UsageError(str(error)) from None
    folder = comparison.save(args.out if args.out is not None else run_folder(Path("runs") / "compare"))
    print(comparison.to_markdown())
    print(
        f"wrote {folder / 'comparison.md'}, comparison.json, comparison.png"
        + (", best.pt" if comparison.best else "")
    )
    return 0 if comparison.best is not None else 1


def _train_and_val(args: argparse.Namespace) -> tuple[Any, Any]:
    """DATA and --val, or a seeded stratified split of DATA; read as DogsVsCats layouts."""
    try:
        data = DogsVsCats(args.data, progress=False)
        if args.val is not None:
            return data, DogsVsCats(args.val, progress=False)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    split = stratified_split(data, args.val_split, seed=args.seed)
    return Subset(data, list(split.train)), Subset(data, list(split.val))


def _seeded(arch: str, seed: int) -> Callable[[], Any]:
    def build() -> Any:
        torch.manual_seed(seed)  # the same random weights every run, so the disk cache finds them again
        return create_model(arch, weights=None)

    return build


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "scan": _scan,
    "predict": _predict,
    "compare": _compare,
}
