"""``vggtransfer scan`` and ``vggtransfer compare``: commands on a folder of images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ._arch_spec import ArchSpec
from ._cli_common import (
    DATA_HELP,
    UsageError,
    add_arch,
    arch_of,
    check_folder,
    check_out,
    claim_run_folder,
    in_option_words,
    read_labelled,
    run_folder,
    usage_errors,
)
from ._compare import compare_backbones
from .data import DogsVsCats, Split, scan_images, stratified_split

__all__ = ["add_parsers", "add_validation", "check_validation", "read_train_and_val", "with_transforms"]


def add_parsers(commands: Any) -> None:
    """Register ``scan`` and ``compare`` with their options."""
    scan = commands.add_parser("scan", help="list the images of a folder that cannot be used, and why")
    scan.add_argument("data", type=Path, metavar="DATA", help="a folder of images (searched recursively)")
    scan.add_argument("--workers", type=int, default=None, help="decoding threads (default: one per core)")
    scan.set_defaults(run=_scan)
    compare = commands.add_parser(
        "compare", help="train the same head on several frozen backbones; rank them"
    )
    compare.add_argument("data", type=Path, metavar="DATA", help=DATA_HELP)
    add_arch(compare, required=True, many=True)
    compare.add_argument("--weights", default="DEFAULT", help="DEFAULT (pretrained) or none (random, seeded)")
    add_validation(compare)
    compare.add_argument("--epochs", type=int, default=10, help="epochs training each head")
    compare.add_argument("--lr", type=float, default=1e-3, help="the heads' learning rate")
    compare.add_argument("--batch-size", type=int, default=32, help="images per step")
    compare.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="train on at most this many images, a stratified subset (default: all)",
    )
    compare.add_argument("--seed", type=int, default=0, help="seeds the split, the heads and the shuffling")
    compare.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    compare.add_argument("--out", type=Path, default=None, help="default: runs/compare, runs/compare2, ...")
    compare.set_defaults(run=_compare)


def add_validation(parser: argparse.ArgumentParser) -> None:
    """``--val DIR`` or ``--val-split F``."""
    either = parser.add_mutually_exclusive_group()
    either.add_argument("--val", type=Path, default=None, help="validation folder (default: a split of DATA)")
    either.add_argument(
        "--val-split", type=float, default=None, help="share of DATA for validation (default: 0.2)"
    )


def _scan(args: argparse.Namespace) -> int:
    if not args.data.is_dir():
        raise UsageError(f"DATA {str(args.data)!r} is not a folder")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"expected --workers to be 1 or more but got {args.workers}")
    report = scan_images(args.data, workers=args.workers, progress=True)
    print(report)
    return 0


def check_validation(args: argparse.Namespace) -> None:
    """``--val`` (and ``--test``) a folder apart from DATA, ``--val-split`` a share strictly between 0 and 1."""
    check_folder(args.val, "--val")
    args.val_split = 0.2 if args.val_split is None else args.val_split
    if not 0 < args.val_split < 1:
        raise UsageError(f"expected --val-split to be between 0 and 1 but got {args.val_split}")
    for option in ("--val", "--test"):
        folder = getattr(args, option[2:], None)
        if folder is not None and args.data is not None and _overlap(folder, args.data):
            raise UsageError(
                f"{option} {str(folder)!r} shares images with DATA {str(args.data)!r}; expected a separate "
                f"folder (or leave {option} out"
                + (" and let --val-split hold some of DATA out)" if option == "--val" else ")")
            )


def _overlap(one: Path, other: Path) -> bool:
    """Whether one folder is the other or lies inside it: then some images would be in both."""
    a, b = one.resolve(), other.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _compare(args: argparse.Namespace) -> int:
    check_folder(args.data, "DATA")
    if args.weights.lower() not in ("default", "none"):
        raise UsageError(f"expected --weights to be DEFAULT or none but got {args.weights!r}")
    check_validation(args)
    if len(set(args.arch)) < len(args.arch):
        raise UsageError(f"expected distinct --arch values but got {' '.join(args.arch)}")
    specs = [arch_of(text) for text in args.arch]
    base = Path("runs") / "compare"
    out = args.out if args.out is not None else run_folder(base)
    check_out(out, {"DATA": args.data, "--val": args.val})
    train, val = with_transforms(*read_train_and_val(args), None, None)
    pretrained = args.weights.lower() == "default"
    models = {spec.text: _builder(spec, None if pretrained else args.seed) for spec in specs if spec}
    try:  # an argument or the data: checked before any backbone is built
        comparison = compare_backbones(
            train, val, models, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            device=args.device, max_images=args.max_images,
        )  # fmt: skip
    except (ValueError, TypeError) as error:
        raise UsageError(in_option_words(str(error), _COMPARE_OPTIONS)) from None
    folder = comparison.save(claim_run_folder(out, base if args.out is None else None))
    print(comparison.to_markdown())
    print(
        f"wrote {folder / 'comparison.md'}, comparison.json, comparison.png"
        + (", best.pt" if comparison.best else "")
    )
    return 0 if comparison.best is not None else 1


def read_train_and_val(args: argparse.Namespace) -> tuple[DogsVsCats, DogsVsCats | Split]:
    """DATA, and --val or a seeded stratified split of DATA; both folders scanned once."""
    data = read_labelled(args.data, "DATA")
    if args.val is not None:
        val = read_labelled(args.val, "--val")
        if val.classes != data.classes:
            raise UsageError(
                f"--val {str(args.val)!r} has the classes {val.classes} but DATA has {data.classes}; "
                f"expected the same class folders in both"
            )
        return data, val
    with usage_errors(ValueError):  # a class too small to split
        return data, stratified_split(data, args.val_split, seed=args.seed)


def with_transforms(
    data: DogsVsCats, val: DogsVsCats | Split, train_transform: Any, transform: Any
) -> tuple[Any, Any]:
    """The training and validation datasets: ``train_transform`` for one, ``transform`` for the other."""
    if isinstance(val, Split):
        return val.subsets(data.with_transform(train_transform), data.with_transform(transform))
    return data.with_transform(train_transform), val.with_transform(transform)


#: compare_backbones' arguments that the command spells as options.
_COMPARE_OPTIONS = ("epochs", "batch_size", "lr", "seed", "device", "max_images")


def _builder(spec: ArchSpec, seed: int | None) -> Any:
    """Build ``spec``'s backbone when compare_backbones asks: pretrained, or random from ``seed``."""

    def build() -> Any:
        if seed is None or spec.kind == "factory":
            return spec.build()
        torch.manual_seed(seed)  # the same random weights every run, so the disk cache finds them again
        return spec.build(weights=None)

    return build
