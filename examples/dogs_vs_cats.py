"""Dogs vs Cats with a pretrained VGG16: the classic transfer-learning recipe, end to end.

    python examples/dogs_vs_cats.py                              # Oxford-IIIT Pet, downloaded once
    python examples/dogs_vs_cats.py --data train --test test1    # Kaggle's train.zip and test1.zip
    python examples/dogs_vs_cats.py --data PetImages --fine-tune-epochs 2
    torchrun --nproc_per_node=2 examples/dogs_vs_cats.py --data train   # one process per GPU

The recipe: torchvision's ImageNet-pretrained VGG16_bn, its convolutional features frozen
(BatchNorm statistics included), its classifier replaced by Linear(25088, 500) - ReLU -
Dropout(0.3) - Linear(500, 2), images resized to 256, centre-cropped to 224 and normalised with
ImageNet's mean and std, and only the new head trained. On Kaggle's 25,000 training images it
reported 97.86% test accuracy (not re-measured by vggtransfer).

Read run() top to bottom: each numbered step is a short block of library calls. The output
folder (--out) receives last.pt and best.pt, metrics.json, curves.png, the report (report.md,
confusion_matrix.png, errors.png, misclassified.csv) and, with --test, submission.csv.
Under torchrun every process trains on its share of each batch, and the first one alone prints
and writes. --help lists every option.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed

import vggtransfer as vt
from vggtransfer.data import DogsVsCats, ScanReport, oxford_pets, stratified_split

GET_DATA = """\
No data: {reason}
Get one of these and pass its folder with --data:
  - Kaggle's Dogs vs Cats: https://www.kaggle.com/c/dogs-vs-cats/data (needs an account);
    unzip train.zip and test1.zip, then: --data train --test test1
  - Microsoft's PetImages archive (kagglecatsanddogs_*.zip from the Microsoft Download Center);
    unzip it, then: --data PetImages
  - Oxford-IIIT Pet (https://www.robots.ox.ac.uk/~vgg/data/pets/): on a machine with internet,
    run this script without --data once; it downloads into --data-root ({data_root})."""

GET_WEIGHTS = """\
Cannot load the pretrained weights:
{error}
With this script, pass that file as --weights /path/to/the/file.pth, or run without transfer
learning (random weights, much lower accuracy): --weights none"""


def run(args: argparse.Namespace, command: str) -> int:
    """The recipe, step by step; returns the exit status."""
    timings: dict[str, float] = {}

    # 1. Data. DogsVsCats reads Kaggle's flat train/ (cat.0.jpg, dog.0.jpg), Microsoft's PetImages
    # (Cat/, Dog/) or one folder per class, and decodes every file once: the broken ones (PetImages
    # has empty and truncated JPEGs) are left out and listed rather than crashing an epoch.
    if args.data is None:
        say(
            f"No --data given: using the Oxford-IIIT Pet dataset (cat vs dog), cached under {args.data_root}/"
        )
    with timed(timings, "scan"):
        try:
            data = DogsVsCats(args.data) if args.data else oxford_pets(args.data_root, download=True)
            test = DogsVsCats(args.test) if args.test else None
        except (OSError, RuntimeError, ValueError) as exc:  # offline, the download's URLError is an OSError
            return fail(GET_DATA.format(reason=exc, data_root=args.data_root))
    scan = ScanReport([path for path, _ in data.samples], data.bad_files)  # what the report lists
    say(f"classes {data.classes}: {scan}")
    if len(data.classes) < 2:
        return fail(f"error: {args.data} has no labels (classes {data.classes}); pass it with --test instead")
    if test is not None and not any(name.lower() in ("dog", "dogs") for name in data.classes):
        return fail(f"error: --test writes the probability of a dog, but the classes are {data.classes}")

    # 2. Split: the same share of every class held out for validation, reproducibly from --seed.
    split = stratified_split(data, args.val_fraction, seed=args.seed)

    # 3. Preprocessing: ImageNet's, at --image-size. Validation images are never augmented.
    transform = vt.imagenet_transform(size=args.image_size)
    train_transform = vt.imagenet_transform(train=True, size=args.image_size) if args.augment else transform
    train, val = split.subsets(data.with_transform(train_transform), data.with_transform(transform))
    say(f"split: {len(train)} training, {len(val)} validation images (seed {args.seed})")

    # 4. The model: pretrained backbone, frozen features, a new head. The head's initial weights
    # come from torch's global generator: seed it, so that --seed repeats the whole run.
    torch.manual_seed(args.seed)
    try:
        model = vt.create_model(args.arch, weights=None if args.weights.lower() == "none" else args.weights)
    except vt.WeightsNotAvailableError as exc:
        return fail(GET_WEIGHTS.format(error=exc))
    if args.method == "replace":  # the recipe: a new classifier in place of the 1000-class one
        model = vt.replace_classifier(vt.freeze_features(model), len(data.classes))
    else:  # keep the whole 1000-class network, frozen, and stack the head after its logits
        model = vt.freeze_features(vt.append_classifier(model, len(data.classes)))

    # 5. Train the head. The frozen features of unaugmented images are computed once and cached,
    # so the epochs after the first are cheap; fit keeps last.pt and best.pt in --out.
    trainer = vt.Trainer(
        model, lr=args.lr, device=args.device, precision=args.precision,
        class_names=data.classes, transform=transform, seed=args.seed,
    )  # fmt: skip
    trainer.extra["split"] = split.to_dict()  # saved in every checkpoint: which files were validation
    processes = f", {trainer.world_size} processes" if trainer.world_size > 1 else ""
    say(
        f"training {args.arch} ({args.method}) on {trainer.device}{processes}, precision {trainer.precision.name}"
    )
    loading: dict[str, Any] = {"batch_size": args.batch_size, "num_workers": args.workers}
    with timed(timings, "fit"):
        trainer.fit(train, val, epochs=args.epochs, checkpoint_dir=args.out, **loading)

    # 6. Optionally fine-tune: unfreeze the features and train every layer, the features at a
    # tenth of the head's rate. `epochs` is the total to reach, so these epochs come on top.
    if args.fine_tune_epochs > 0:
        say(f"fine-tuning all layers, the features at lr {args.lr / 10:g}")
        trainer.unfreeze_features(lr=args.lr / 10)
        with timed(timings, "fine-tune"):
            total = args.epochs + args.fine_tune_epochs
            trainer.fit(train, val, epochs=total, checkpoint_dir=args.out, **loading)

    # 7. Evaluate, on the training images (without augmentation) and on the validation images.
    with timed(timings, "evaluate"):
        unaugmented_train, _ = split.subsets(data.with_transform(transform))
        train_metrics = trainer.evaluate(unaugmented_train, **loading)
        val_metrics = trainer.evaluate(val, **loading)
    say(f"train accuracy {train_metrics['accuracy']:.2%}, validation accuracy {val_metrics['accuracy']:.2%}")

    # 8. Reload the last checkpoint into a freshly built model, as a deployment would, and check
    # it gives the same accuracy. The original recipe needed load_state_dict(strict=False) here,
    # which silently skips mismatched keys; load_model rebuilds the recorded architecture and
    # head, checks every weight's name and shape, and returns the class names and preprocessing.
    with timed(timings, "reload"):
        model, class_names, reloaded_transform = vt.load_model(args.out / "last.pt", device=trainer.device)
        reloaded = vt.Trainer(
            model, device=trainer.device, precision=args.precision, class_names=class_names,
            transform=reloaded_transform, progress=False,
        )  # fmt: skip
        reloaded_metrics = reloaded.evaluate(val, **loading)
    same = reloaded_metrics["accuracy"] == val_metrics["accuracy"]
    accuracy, verdict = reloaded_metrics["accuracy"], "same" if same else "DIFFERENT"
    say(f"reloaded {args.out / 'last.pt'}: validation accuracy {accuracy:.2%} ({verdict})")
    if not vt.is_main_process():
        return 0 if same else 1  # the first process alone writes the files

    # 9. The report: per-class metrics, confusion matrix, the worst errors as a picture and a CSV.
    # vt.write_report evaluates in one process, so under torchrun it is left out.
    if trainer.world_size > 1:
        print(
            f"skipped the report: vt.write_report runs in one process, not {trainer.world_size} "
            f"(write it from {args.out / 'last.pt'} in a single process)"
        )
    else:
        with optional_plots("the report"):
            vt.write_report(
                reloaded, val, args.out, batch_size=args.batch_size, num_workers=args.workers,
                scan=scan, model=describe(args, data.classes), timings=timings, command=command,
            )  # fmt: skip
            print(f"wrote the report: {args.out / 'report.md'}")

    # 10. For Kaggle's test1/ folder: submission.csv, id and the probability of a dog.
    if test is not None:
        submission = args.out / "submission.csv"
        result = vt.write_kaggle_submission(reloaded, test, submission, batch_size=args.batch_size)
        print(f"wrote {result.path} ({result.rows} rows, {len(result.skipped)} unreadable files skipped)")

    # 11. The numbers, and the learning curves.
    metrics = {
        "train": train_metrics, "val": val_metrics, "reloaded_val_accuracy": reloaded_metrics["accuracy"],
        "counts": {"images": len(data), "train": len(train), "val": len(val), "bad": len(data.bad_files)},
        "bad_files": [{"path": str(bad.path), "reason": bad.reason} for bad in data.bad_files],
        "class_names": data.classes, "timings": timings, "history": trainer.history.to_dict()["records"],
        "command": command,
    }  # fmt: skip
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with optional_plots("curves.png"):
        trainer.history.plot(args.out / "curves.png")
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'curves.png'}")
    return 0 if same else 1


# ---------------------------------------------------------------------- plumbing


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    add("--data", type=Path, help="labelled images, any layout; default: Oxford-IIIT Pet (downloaded)")
    add("--test", type=Path, help="unlabelled images (Kaggle's test1/) to write OUT/submission.csv for")
    add("--data-root", type=Path, default=Path("data"), help="where Oxford-IIIT Pet is downloaded and cached")
    add("--arch", default="vgg16_bn", help="any torchvision classification model")
    add("--weights", default="DEFAULT", help="DEFAULT, an enum name like IMAGENET1K_V1, none, or a .pth file")
    add("--method", choices=["replace", "append"], default="replace",
        help="replace the classifier, or append a head after the 1000-class net")  # fmt: skip
    add("--epochs", type=count(1), default=3, help="epochs training the head with frozen features")
    add("--fine-tune-epochs", type=count(0), default=0, help="then epochs training all layers")
    add("--batch-size", type=count(1), default=32)
    add("--lr", type=float, default=1e-3, help="the head's learning rate (the features': lr/10)")
    add("--image-size", type=int, default=224, help="crop size; images are resized to size*256/224 first")
    add("--augment", action="store_true", help="random crops and flips for training (the recipe uses none)")
    add("--val-fraction", type=float, default=0.2)
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    add("--workers", type=count(0), default=None, help="loader processes (%(default)s: one per core but one)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=Path("runs/dogs_vs_cats"), help="output folder")
    return parser.parse_args(argv)


def count(minimum: int) -> Any:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum} but got {text!r}")
        return int(text)

    return parse


def describe(args: argparse.Namespace, classes: list[str]) -> str:
    """The model, in one line of the report."""
    weights = "random" if args.weights.lower() == "none" else args.weights
    head = "classifier replaced" if args.method == "replace" else "head appended"
    tuned = f", then {args.fine_tune_epochs} more with every layer trained" if args.fine_tune_epochs else ""
    return (
        f"{args.arch} ({weights} weights), {head}, {len(classes)} classes, {args.image_size} px; "
        f"{args.epochs} epochs with the features frozen{tuned}"
    )


def say(*values: Any, **options: Any) -> None:
    """print, in the first process only: under torchrun every process runs this script."""
    if vt.is_main_process():
        print(*values, **options)


def fail(message: str) -> int:
    say(message, file=sys.stderr)
    return 2


@contextlib.contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[phase] = round(time.perf_counter() - started, 3)


@contextlib.contextmanager
def optional_plots(what: str) -> Iterator[None]:
    """Plots need matplotlib (the plots extra); without it, say so and carry on."""
    try:
        yield
    except ModuleNotFoundError as exc:
        print(f"skipped {what}: {exc}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "examples/dogs_vs_cats.py", *argv])
    try:
        return run(parse_args(argv), command)
    except ValueError as exc:  # the library checks every option and says what was wrong
        return fail(f"error: {exc}")
    except KeyboardInterrupt:  # fit has saved interrupted.pt and said where
        return 130
    finally:
        if torch.distributed.is_initialized():  # joined by the Trainer under torchrun
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
