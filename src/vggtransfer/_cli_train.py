"""``vggtransfer train``: a folder of images in, a run folder out (checkpoints, metrics, plots, report).

The recipe, as the library runs it: scan the data, build the backbone (``--arch``), freeze its
features, replace its classifier, train the head (then optionally fine-tune everything), and
analyse the best epoch on the validation images. Every option is checked, and every folder
scanned, before a backbone is built or a weight downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ._arch_spec import ArchSpec
from ._checkpoint import load_model
from ._checkpoint_file import atomic_write_text
from ._cli_checkpoint import metrics_lines, scan_of
from ._cli_common import (
    DATA_HELP,
    UsageError,
    add_arch,
    arch_of,
    check_folder,
    check_out,
    check_positive,
    check_runtime,
    claim_run_folder,
    describe_model,
    make_trainer,
    read_labelled,
    run_folder,
    usage_errors,
)
from ._cli_data import add_validation, check_validation, read_train_and_val, with_transforms
from ._freeze import freeze_features
from ._heads import replace_classifier
from ._labels import dataset_labels
from ._loggers import CSVLogger, TensorBoardLogger
from ._models import Weights, WeightsNotAvailableError
from ._plotting import pyplot
from ._report import balance_warning, write_report
from ._trainer import Trainer
from ._transforms import ImageTransform, default_transform
from .data import Split

__all__ = ["add_parser"]

#: The smallest --image-size: VGG's five poolings need at least 32 pixels.
MIN_IMAGE_SIZE = 32
#: The largest --image-size: a 4096 px batch of 32 already takes 6 GB before the model sees it.
MAX_IMAGE_SIZE = 4096
#: Seeds are 64-bit for torch's generators; the Trainer derives per-epoch seeds below this.
SEED_LIMIT = 2**63


def add_parser(commands: Any) -> None:
    """Register ``train`` with its options."""
    train = commands.add_parser(
        "train", help="train a classifier on a folder; write checkpoints and a report"
    )
    train.add_argument("data", type=Path, metavar="DATA", help=DATA_HELP)
    add_validation(train)
    train.add_argument(
        "--test", type=Path, metavar="DIR", help="labelled test images, evaluated once at the end"
    )
    add_arch(train, default="vgg16_bn")
    train.add_argument(
        "--weights", default=None, help="DEFAULT (pretrained, the default), none, or a .pth file"
    )
    train.add_argument("--epochs", type=int, default=5, help="epochs training the head, features frozen")
    train.add_argument("--fine-tune-epochs", type=int, default=0, help="then epochs training every layer")
    train.add_argument(
        "--lr", type=float, default=1e-3, help="the head's learning rate (fine-tuning: a tenth)"
    )
    train.add_argument("--batch-size", type=int, default=32, help="images per step")
    train.add_argument(
        "--image-size", type=int, default=None, help="crop size, 32 to 4096 (default: the weights', 224)"
    )
    train.add_argument("--augment", action="store_true", help="random crops and flips of the training images")
    train.add_argument(
        "--cache-views", type=int, default=None, metavar="K", help="with --augment: cache K views"
    )
    train.add_argument(
        "--class-weights",
        default=None,
        metavar="W",
        help="balanced, or one weight per class: 1,4 (weights the loss)",
    )
    train.add_argument("--tensorboard", action="store_true", help="also log every epoch for TensorBoard")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    train.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 on GPUs that have it",
    )
    train.add_argument("--seed", type=int, default=0, help="seeds the split, the heads and the shuffling")
    train.add_argument("--out", type=Path, default=None, help="default: runs/train, runs/train2, ...")
    train.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    spec, weights, out = _check(args)
    timings: dict[str, float] = {}
    with _phase(timings, "scan"):
        data, val = read_train_and_val(args)
        test = read_labelled(args.test, "--test") if args.test is not None else None
    if test is not None and test.classes != data.classes:
        raise UsageError(f"--test has the classes {test.classes} but DATA has {data.classes}")
    _check_classes(args, data.classes)
    _say_scan(args.data, data)
    with _phase(timings, "build"):
        model = _model(spec, weights, len(data.classes), args.seed)
        transform = _transform(model, args.image_size)
    train_set, val_set = with_transforms(data, val, _training(transform, args.augment), transform)
    missing = [folder for folder in out.parents if not folder.exists()]  # made by the claim, deepest first
    existed = out.exists()
    out = claim_run_folder(out, Path("runs") / "train" if args.out is None else None)
    trainer = _make_trainer(model, transform, data.classes, args, out, ([] if existed else [out]) + missing)
    command = shlex.join(["vggtransfer", "train", *args.argv])
    # Plain data in every checkpoint: how to rerun, and which images validated (to evaluate again).
    trainer.extra = {"command": command, **({"split": val.to_dict()} if isinstance(val, Split) else {})}
    _fit(trainer, train_set, val_set, args, out, timings)
    best = _best_epoch(trainer)
    load_model(out / "best.pt", model=trainer.network, device=trainer.device)  # analyse the best epoch
    tested: dict[str, Any] = {}
    if test is not None:  # before the report, whose timings then include it
        with _phase(timings, "test"):
            tested["test"] = trainer.evaluate(test.with_transform(transform), batch_size=args.batch_size)
    with _phase(timings, "report"):
        evaluation = write_report(
            trainer, val_set, out, batch_size=args.batch_size, num_workers=None, scan=scan_of(data),
            model=_model_summary(trainer), timings=dict(timings), command=command,
            summary=_data_summary(args, train_set, val_set, test, data.classes),
        )  # fmt: skip
        trainer.history.plot(out / "curves.png")
    results: dict[str, Any] = {"val": evaluation.metrics, **tested}
    _write_metrics(out, trainer, spec, best, results, timings, command, data)
    _say_where(out, best, results, args.tensorboard)
    return 0


def _check(args: argparse.Namespace) -> tuple[ArchSpec, Weights, Path]:
    """Every option, before any folder is scanned: the spec, the weights, the run folder."""
    for folder, what in ((args.data, "DATA"), (args.test, "--test")):
        check_folder(folder, what)
    check_validation(args)
    for option in ("epochs", "batch_size"):
        check_positive(getattr(args, option), "--" + option.replace("_", "-"))
    check_positive(args.fine_tune_epochs, "--fine-tune-epochs", zero=True)
    check_positive(args.lr, "--lr")
    check_positive(args.cache_views, "--cache-views")
    check_positive(args.seed, "--seed", zero=True)
    if args.seed >= SEED_LIMIT:
        raise UsageError(f"expected --seed to be at most 2**63 - 1 but got {args.seed}")
    if args.image_size is not None and not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        raise UsageError(
            f"expected --image-size to be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (pixels) but got {args.image_size}"
        )
    if args.cache_views is not None and not args.augment:
        raise UsageError("--cache-views caches augmented views of the training images: it needs --augment")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(
            "vggtransfer train runs in one process; under torchrun, train with vt.Trainer from a script "
            "(examples/dogs_vs_cats.py runs unchanged there, see docs/scaling.md)"
        )
    pyplot("vggtransfer train")  # the run folder's plots need matplotlib: say so now, not after training
    spec = arch_of(args.arch)
    assert spec is not None
    if spec.kind == "factory" and args.weights is not None:
        raise UsageError(
            f"--weights applies to torchvision and timm names; the factory {spec.text!r} loads its own weights"
        )
    text = args.weights or "DEFAULT"
    weights: Weights = None if text.lower() == "none" else text
    out = args.out if args.out is not None else run_folder(Path("runs") / "train")
    check_out(out, {"DATA": args.data, "--val": args.val, "--test": args.test})
    _class_weights(args.class_weights)
    check_runtime(args.device, args.precision)
    _loggers(out, args.tensorboard)  # a missing tensorboard extra is said now, not after the scan
    return spec, weights, out


def _make_trainer(
    model: torch.nn.Module, transform: ImageTransform, classes: list[str], args: argparse.Namespace,
    out: Path, made: list[Path],
) -> Trainer:  # fmt: skip
    """The Trainer, logging into the claimed run folder; an option it refuses removes the ``made`` folders."""
    try:
        return make_trainer(
            model, lr=args.lr, device=args.device, precision=args.precision, seed=args.seed,
            class_names=classes, transform=transform, cache_views=args.cache_views,
            class_weights=_class_weights(args.class_weights), callbacks=_loggers(out, args.tensorboard),
        )  # fmt: skip
    except UsageError:
        for folder in made:
            folder.rmdir()  # still empty: made a moment ago
        raise


def _check_classes(args: argparse.Namespace, classes: list[str]) -> None:
    """What needs the class count: checked after the scan, before a backbone is built or downloaded."""
    if len(classes) < 2:
        raise UsageError(
            f"DATA {str(args.data)!r} has {len(classes)} class ({', '.join(classes)}); expected 2 or more "
            f"class folders (or Kaggle's cat.N.jpg / dog.N.jpg names)"
        )
    weights = _class_weights(args.class_weights)
    if isinstance(weights, list) and len(weights) != len(classes):
        raise UsageError(
            f"expected one --class-weights value per class of DATA ({', '.join(classes)}) but got "
            f"{len(weights)}: {args.class_weights}"
        )


def _class_weights(text: str | None) -> str | list[float] | None:
    """``--class-weights``: ``balanced`` or comma-separated numbers (the Trainer checks the values)."""
    if text is None or text == "balanced":
        return text
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(
            f"expected --class-weights to be balanced or one number per class, such as 1,4, but got {text!r}"
        ) from None


def _loggers(out: Path, tensorboard: bool) -> list[Any]:
    """history.csv, rewritten after every epoch so that a long run can be watched; TensorBoard's events."""
    loggers: list[Any] = [CSVLogger(out / "history.csv")]
    if tensorboard:
        loggers.append(TensorBoardLogger(out / "tensorboard"))
    return loggers


@contextmanager
def _phase(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 3)


def _model(spec: ArchSpec, weights: Weights, classes: int, seed: int) -> torch.nn.Module:
    """The backbone with frozen features and a new head; seeded, so a rerun starts from the same head."""
    torch.manual_seed(seed)
    with usage_errors(ValueError, TypeError, FileNotFoundError):
        try:
            backbone = spec.build(weights)
        except WeightsNotAvailableError as error:  # offline: say it in the command's own words
            raise WeightsNotAvailableError(
                f"{error}\nWith vggtransfer train: --weights /path/to/the/file.pth, or --weights none."
            ) from None
        return replace_classifier(freeze_features(backbone), classes)


def _transform(model: torch.nn.Module, size: int | None) -> ImageTransform:
    """The weights' evaluation preprocessing, at ``--image-size`` (resized in the same proportion)."""
    base = default_transform(model)
    if size is None:
        return base
    resize = max(size, round(size * base.resize / base.size))
    return ImageTransform.from_dict({**base.to_dict(), "size": size, "resize": resize})


def _training(transform: ImageTransform, augment: bool) -> ImageTransform:
    return ImageTransform.from_dict({**transform.to_dict(), "train": True}) if augment else transform


def _fit(
    trainer: Trainer, train: Any, val: Any, args: argparse.Namespace, out: Path, timings: dict[str, float]
) -> None:
    options: dict[str, Any] = {"batch_size": args.batch_size, "checkpoint_dir": out}
    with _phase(timings, "fit"):
        trainer.fit(train, val, epochs=args.epochs, **options)
    if args.fine_tune_epochs:
        trainer.progress.message(f"fine-tuning every layer at lr {args.lr / 10:g}")
        trainer.unfreeze_features(lr=args.lr / 10)
        with _phase(timings, "fine-tune"):
            trainer.fit(train, val, epochs=args.epochs + args.fine_tune_epochs, **options)


def _best_epoch(trainer: Trainer) -> dict[str, float]:
    """The epoch best.pt holds: the lowest finite validation loss, the first of equals (as ``fit`` keeps it)."""
    finite = [record for record in trainer.history if math.isfinite(record["val_loss"])]
    return min(finite or list(trainer.history), key=lambda record: record["val_loss"])


def _write_metrics(
    out: Path, trainer: Trainer, spec: ArchSpec, best: dict[str, float], results: dict[str, Any],
    timings: dict[str, float], command: str, data: Any,
) -> None:  # fmt: skip
    record = {
        "command": command,
        "arch": spec.text,
        "class_names": trainer.class_names,
        "data": {"images": len(data), "bad_files": len(data.bad_files)},
        "class_weights": trainer.class_weights,
        "best_epoch": int(best["epoch"]),
        "history": list(trainer.history),
        **{split: _plain(metrics) for split, metrics in results.items()},
        "timings": timings,
    }
    atomic_write_text(out / "metrics.json", json.dumps(record, indent=2) + "\n")


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("accuracy", "balanced_accuracy", "loss", "count", "per_class", "confusion_matrix")
    return {key: metrics[key] for key in keep}


def _say_where(out: Path, best: dict[str, float], results: dict[str, Any], tensorboard: bool) -> None:
    for split, metrics in results.items():
        print(f"{'validation' if split == 'val' else split}: " + "\n".join(metrics_lines(metrics)))
    print(f"run folder {out}:")
    print(
        f"  {out / 'best.pt'}   epoch {int(best['epoch'])} (lowest val_loss, {best['val_loss']:.4f}); last.pt"
    )
    print(f"  {out / 'report.md'}   with confusion_matrix.png, errors.png, misclassified.csv")
    print(
        f"  {out / 'metrics.json'}   and curves.png, history.csv" + (", tensorboard/" if tensorboard else "")
    )


def _data_summary(args: argparse.Namespace, train: Any, val: Any, test: Any, names: list[str]) -> str:
    """report.md's opening of the data section: what trained and validated the model, and its balance."""
    labels = dataset_labels(train, "vggtransfer train")  # recorded labels: no image is read
    counts = [labels.count(index) for index in range(len(names))]
    per_class = ", ".join(f"{name} {count}" for name, count in zip(names, counts, strict=True))
    where = (
        f"`{args.val}`"
        if args.val is not None
        else f"a stratified {args.val_split:.0%} split (seed {args.seed})"
    )
    text = f"Trained on {len(train)} images of `{args.data}` ({per_class}); validated on {len(val)} images of {where}"
    text += f"; tested on {len(test)} images of `{args.test}`." if test is not None else "."
    warning = balance_warning(names, counts)
    return text + (f"\n\nTraining data: {warning}" if warning else "")


def _model_summary(trainer: Trainer) -> str:
    """report.md's model section: how it was built, and the class weights of its training loss."""
    text = describe_model(trainer.network)
    if trainer.class_weights is not None:
        weights = ", ".join(
            f"{n} {w:.3g}" for n, w in zip(trainer.class_names or [], trainer.class_weights, strict=True)
        )
        text += f" The training loss was weighted per class ({weights})."
    return text


#: How many of the files left out ``train`` names before it points to report.md for the rest.
SHOWN_BAD_FILES = 10


def _say_scan(folder: Path, data: Any) -> None:
    """What the scan found: the images per class, and the files left out (all of them are in report.md)."""
    counts = ", ".join(f"{name} {data.targets.count(i)}" for i, name in enumerate(data.classes))
    print(f"DATA {folder}: {len(data)} images ({counts}); {len(data.bad_files)} files left out")
    for bad in data.bad_files[:SHOWN_BAD_FILES]:
        print(f"  left out {bad.path}: {bad.reason}")
    if len(data.bad_files) > SHOWN_BAD_FILES:
        print(f"  ... and {len(data.bad_files) - SHOWN_BAD_FILES} more, listed in report.md")
