"""Random augmentation three ways, in one process on the same photos: is cache_views worth it?

    python benchmarks/augmentation.py                      # CPU: VGG16_bn, 112 px, the pet sample
    python benchmarks/augmentation.py --weights vgg16_bn-6c64b313.pth --size 224

Trains the recipe's head (frozen VGG16_bn features, Linear-ReLU-Dropout-Linear, Adam) for
--epochs epochs on a stratified 80/20 split of the photos, three ways:

- ``uncached``: ``imagenet_transform(train=True)``; caching is off, so every epoch runs the feature
  pass over freshly augmented images (what every other library does with augmentation);
- ``views``: the same transform with ``Trainer(cache_views=K)``: K feature passes up front, then
  each epoch trains on one cached view per image;
- ``no-augmentation``: ``imagenet_transform()``, cached once (the reference for speed).

Validation is never augmented, and cached in all three. Prints a Markdown table (wall time of
the whole fit, validation accuracy) and writes the numbers to --out as JSON. Weights are random
unless --weights names a file of ImageNet weights: accuracy then means little, speed the same.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import vggtransfer as vt
from vggtransfer.data import DogsVsCats, stratified_split

PETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford-pets-sample"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=PETS, help="class folders of photos")
    parser.add_argument("--arch", default="vgg16_bn")
    parser.add_argument("--weights", default=None, help="a local weights file (default: random weights)")
    parser.add_argument("--size", type=int, default=112, help="crop size")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--views", type=int, default=2, help="K of cache_views")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants")
    parser.add_argument("--out", type=Path, default=Path("augmentation.json"))
    return parser.parse_args()


def build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial head (and random backbone) for every variant
    model = vt.create_model(args.arch, weights=args.weights)
    return vt.replace_classifier(vt.freeze_features(model), 2)


def run(args: argparse.Namespace, variant: str, data: DogsVsCats, cache: Path) -> dict[str, Any]:
    split = stratified_split(data, 0.2, seed=0)
    augmenting = variant != "no-augmentation"
    train_data = data.with_transform(vt.imagenet_transform(train=augmenting, size=args.size))
    val_data = data.with_transform(vt.imagenet_transform(size=args.size))
    train, val = split.subsets(train_data, val_data)
    trainer = vt.Trainer(
        build(args),
        device=args.device,
        seed=0,
        progress=False,
        cache_dir=cache,
        cache_views=args.views if variant == "views" else None,
    )
    started = time.perf_counter()
    history = trainer.fit(
        train, val, epochs=args.epochs, batch_size=args.batch_size, num_workers=args.workers
    )
    wall = time.perf_counter() - started
    return {
        "variant": variant,
        "wall_s": round(wall, 2),
        "epoch_s": [round(r["time_s"], 2) for r in history],
        "val_accuracy": history[-1]["val_accuracy"],
        "best_val_accuracy": max(r["val_accuracy"] for r in history),
        "train_images": len(train),
        "val_images": len(val),
        "cache": trainer.cache_report["fit(train)"],
    }


def main() -> int:
    args = parse_args()
    torch.set_num_threads(torch.get_num_threads())
    data = DogsVsCats(args.data, progress=False)
    variants = args.only or ["uncached", "views", "no-augmentation"]
    results = []
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: nothing reused from earlier runs
        for variant in variants:
            results.append(run(args, variant, data, Path(cache) / variant))
            print(f"{variant}: {results[-1]}", flush=True)
    by_name = {r["variant"]: r for r in results}
    summary: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "arch": args.arch,
        "weights": args.weights or "random",
        "size": args.size,
        "epochs": args.epochs,
        "views": args.views,
        "results": results,
    }
    if {"uncached", "views"} <= set(by_name):
        summary["views_over_uncached_time"] = round(
            by_name["views"]["wall_s"] / by_name["uncached"]["wall_s"], 3
        )
        summary["accuracy_difference_points"] = round(
            100 * (by_name["views"]["val_accuracy"] - by_name["uncached"]["val_accuracy"]), 2
        )
    args.out.write_text(json.dumps(summary, indent=2))
    print("\n| variant | fit wall | per epoch after the first | val accuracy (last / best) |")
    print("| --- | --- | --- | --- |")
    for r in results:
        later = sum(r["epoch_s"][1:]) / max(1, len(r["epoch_s"]) - 1)
        print(
            f"| {r['variant']} | {r['wall_s']:.1f} s | {later:.2f} s | "
            f"{100 * r['val_accuracy']:.1f}% / {100 * r['best_val_accuracy']:.1f}% |"
        )
    for key in ("views_over_uncached_time", "accuracy_difference_points"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
