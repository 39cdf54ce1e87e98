"""The two speed targets of ``compare_backbones`` (issue 12), on generated or sample photos.

    python benchmarks/compare_backbones.py --device cuda --images 2000 --val 500 --epochs 10
    python benchmarks/compare_backbones.py --device cpu --tensors --image-size 32 --images 64 \\
        --val 32 --epochs 2 --archs resnet18,squeezenet1_1 --workers 0          # a quick check

1. **Rerun**: a second ``compare_backbones`` on the same data (the features now in the disk cache)
   runs at least 4x faster than the first.
2. **Overhead**: comparing the backbones costs at most 1.1x the sum of their single runs, each a
   plain ``Trainer.fit`` (one feature pass, then the head's epochs) in a fresh cache folder.

The data is class folders of JPEGs (``cats/``, ``dogs/``) made from the photos in ``--photos``
(the Oxford-IIIT Pet sample by default) or, without photos, smooth synthetic images; each
backbone preprocesses them as its weights expect (224 px). ``--tensors`` uses preprocessed
tensors of ``--image-size`` px instead (no decoding: for quick checks on a CPU). The backbones
have random weights (speed does not depend on them), written to a file once and built from it,
as pretrained weights are: every build of one is the same, so the disk cache finds it again,
and the best model's checkpoint holds only its head. Building the models is timed too: the
comparison builds each one, and the single runs report it apart. Prints a table and writes
``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from end_to_end import PETS, source_images  # the same files as the end-to-end benchmark (this folder)
from torch.utils.data import Dataset, TensorDataset

import vggtransfer as vt
from vggtransfer.data import DogsVsCats, ImageList


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="resnet50,vgg16_bn,efficientnet_b0", help="comma-separated")
    parser.add_argument("--images", type=int, default=2000, help="training images (half each class)")
    parser.add_argument("--val", type=int, default=500, help="validation images")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: cores - 1)")
    parser.add_argument("--tensors", action="store_true", help="preprocessed tensors instead of JPEG files")
    parser.add_argument("--image-size", type=int, default=224, help="side of the tensors (--tensors)")
    parser.add_argument("--photos", type=Path, default=PETS, help="photos to make the files from")
    parser.add_argument("--out", type=Path, default=Path("compare_backbones.json"))
    return parser.parse_args()


def write_folders(root: Path, counts: dict[str, int], photos: Path) -> None:
    """``root/<split>/{cats,dogs}/N.jpg``: separate files, as a real data set has."""
    pool = source_images(photos)
    for split, count in counts.items():
        for i in range(count):
            folder = root / split / ("cats", "dogs")[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            pool[(i + len(split)) % len(pool)].save(folder / f"{i}.jpg", quality=75)


def tensors(count: int, size: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(count, 3, size, size, generator=generator), torch.arange(count) % 2)


def weights_files(archs: list[str], folder: Path) -> dict[str, Path]:
    """A random state dict of each architecture in a file, as pretrained weights would be."""
    files = {}
    folder.mkdir(parents=True, exist_ok=True)
    for seed, arch in enumerate(archs):
        torch.manual_seed(seed)
        files[arch] = folder / f"{arch}.pth"
        torch.save(vt.create_model(arch, weights=None).state_dict(), files[arch])
    return files


def builder(arch: str, weights: Path) -> Callable[[], torch.nn.Module]:
    # Built from a file, like pretrained weights: the same weights every time (the disk cache
    # finds them), and a backbone that can be rebuilt, so the best checkpoint holds only the head.
    return lambda: vt.create_model(arch, weights=weights)


def single(
    arch: str,
    build: Callable[[], torch.nn.Module],
    data: tuple[Any, Any],
    args: argparse.Namespace,
    cache: Path,
) -> dict[str, Any]:
    """One plain Trainer.fit of ``arch``: build, one feature pass, the head's epochs."""
    started = time.perf_counter()
    model = vt.replace_classifier(vt.freeze_features(build()), 2)
    transform = vt.imagenet_transform()  # weights from a file: what default_transform gives
    train, val = (d if isinstance(d, TensorDataset) else d.with_transform(transform) for d in data)
    trainer = vt.Trainer(model, device=args.device, seed=0, progress=False, cache_dir=cache)
    build_s = time.perf_counter() - started
    fitted = time.perf_counter()
    history = trainer.fit(
        train, val, epochs=args.epochs, batch_size=args.batch_size, num_workers=args.workers
    )
    synchronize(trainer.device)
    fit_s = time.perf_counter() - fitted
    head_s = sum(history["time_s"])
    return {
        "arch": arch,
        "build_s": build_s,
        "fit_s": fit_s,
        "feature_pass_s": fit_s - head_s,
        "head_s": head_s,
        "cache": trainer.cache_report,
        "device": device_name(trainer.device),
    }


def few(data: tuple[Any, Any], count: int) -> tuple[Any, Any]:
    """About ``count`` samples of each data set, of both classes."""
    cut = []
    for d in data:
        if isinstance(d, TensorDataset):
            cut.append(TensorDataset(*(t[:count] for t in d.tensors)))
        else:
            samples = d.samples[:: max(1, len(d) // count)][:count]
            cut.append(ImageList(samples, d.classes))
    return cut[0], cut[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def compared(
    data: tuple[Any, Any], models: dict[str, Any], args: argparse.Namespace, cache: Path
) -> tuple[float, vt.Comparison]:
    started = time.perf_counter()
    comparison = vt.compare_backbones(
        data[0], data[1], models, epochs=args.epochs, batch_size=args.batch_size, device=args.device,
        cache_dir=cache, progress=False, num_workers=args.workers,
    )  # fmt: skip
    return time.perf_counter() - started, comparison


def main() -> int:
    args = parse_args()
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {arch: builder(arch, path) for arch, path in weights_files(archs, root / "weights").items()}
        data: tuple[Dataset[Any], Dataset[Any]]
        if args.tensors:
            data = (tensors(args.images, args.image_size, 0), tensors(args.val, args.image_size, 1))
        else:
            write_folders(root / "data", {"train": args.images, "val": args.val}, args.photos)
            # Scanned once here (every file decoded: the page cache is warm for every phase).
            data = (DogsVsCats(root / "data" / "train"), DogsVsCats(root / "data" / "val"))
        # Untimed: CUDA's context, cuDNN's choice of kernels for each backbone's batch shape, the
        # CPU's kernel caches. Whatever runs first would otherwise pay for them.
        for arch in archs:
            single(arch, models[arch], few(data, 2 * args.batch_size), args, root / f"warm-up-{arch}")
        singles = [single(arch, models[arch], data, args, root / f"single-{arch}") for arch in archs]
        first_s, first = compared(data, models, args, root / "compare")
        second_s, second = compared(data, models, args, root / "compare")
    fits = sum(s["fit_s"] for s in singles)
    builds = sum(s["build_s"] for s in singles)
    result = {
        "archs": archs,
        "images": args.images,
        "val": args.val,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "data": f"tensors {args.image_size} px" if args.tensors else "JPEG folders, 224 px",
        "device": singles[0]["device"],
        "cores": os.cpu_count() or 0,
        "torch": torch.__version__,
        "singles": singles,
        "singles_fit_s": fits,
        "singles_build_s": builds,
        "first_s": first_s,
        "second_s": second_s,
        "rerun_speedup": first_s / second_s,
        "overhead": first_s / fits,
        "overhead_with_builds": first_s / (fits + builds),
        "first_rows": first.rows,
        "second_rows": second.rows,
    }
    report(result)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


def report(result: dict[str, Any]) -> None:
    print(
        f"{', '.join(result['archs'])}: {result['images']} + {result['val']} images ({result['data']}), "
        f"{result['epochs']} epochs, batch {result['batch_size']}, on {result['device']}"
    )
    print(
        "| backbone | single: build (s) | single: feature pass (s) | single: head (s) | compare 1st: feature pass (s) | compare 2nd: feature pass (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for one, row1, row2 in zip(result["singles"], result["first_rows"], result["second_rows"], strict=True):
        first_pass = "failed" if row1["error"] else f"{row1['feature_pass_s']:.2f}"
        second_pass = "failed" if row2["error"] else f"{row2['feature_pass_s']:.2f}"
        print(
            f"| {one['arch']} | {one['build_s']:.2f} | {one['feature_pass_s']:.2f} | {one['head_s']:.2f} | "
            f"{first_pass} | {second_pass} |"
        )
    print("| measure | value | target |")
    print("| --- | --- | --- |")
    print(f"| first compare_backbones (s) | {result['first_s']:.2f} | |")
    print(f"| second compare_backbones, same data (s) | {result['second_s']:.2f} | |")
    print(f"| **rerun speed-up** (first / second) | **{result['rerun_speedup']:.2f}x** | >= 4x |")
    print(f"| sum of single fits: feature pass + head epochs (s) | {result['singles_fit_s']:.2f} | |")
    print(
        f"| **comparison overhead** (first / sum of single fits) | **{result['overhead']:.3f}x** | <= 1.1x |"
    )
    print(f"| the same, single fits plus their builds | {result['overhead_with_builds']:.3f}x | |")


if __name__ == "__main__":
    sys.exit(main())
