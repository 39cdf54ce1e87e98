"""The seed recipe's plain training loop against vggtransfer's Trainer, in one process, same data.

    python benchmarks/seed_vs_vggtransfer.py                      # CPU: VGG16_bn, 112 px, 256 images
    python benchmarks/seed_vs_vggtransfer.py --device cuda --size 224 --images 4096

The seed recipe (frozen VGG16_bn features, new 25088-500-2 head, Adam, fp32; strict fp32 on CUDA,
without TF32) recomputes the frozen feature pass every epoch. vggtransfer computes it once
(feature caching), trains the head on the cached features with a fused optimizer, and on GPUs
uses bf16 autocast and channels_last; --compile adds compile_features and compile_model. Both
read the same JPEG files with the same preprocessing settings (the seed through torchvision's
classic Pillow transforms, vggtransfer through imagenet_transform), batch size and loader
workers. Full fine-tuning is timed on preprocessed tensors in memory (compute, not decoding):
the seed's plain loop against Trainer.fit. Weights are random (weights=None): speed does not
depend on their values.

Prints a Markdown table and writes the numbers to --out as JSON. On CUDA it also measures the
bf16 matmul rate in the same run and reports each phase's achieved TFLOP/s against it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

import vggtransfer as vt
from vggtransfer._runtime import resolve_device
from vggtransfer._sources import default_workers
from vggtransfer.data import DogsVsCats, ImageList

PETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford-pets-sample"
# VGG16_bn forward cost at 224 px, from torchvision's weights metadata (GFLOPS counts
# multiply-adds), as FLOPs: 2 * 15.47e9.
VGG16_BN_FLOPS_224 = 2 * 15.47e9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--images", type=int, default=256, help="training images (real photos, repeated if needed)"
    )
    parser.add_argument("--size", type=int, default=112, help="crop size")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: cores - 1)")
    parser.add_argument(
        "--fine-tune-steps", type=int, default=3, help="batches per epoch of the full fine-tuning measurement"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="vggtransfer: compile the feature pass (inductor freezing) and the fine-tuning steps",
    )
    parser.add_argument("--data", type=Path, default=PETS, help="folder of photos (class sub-folders)")
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"))
    return parser.parse_args()


def make_dataset(args: argparse.Namespace, folder: Path) -> ImageList:
    """``args.images`` real JPEG files in class folders under ``folder`` (copied, repeated as needed)."""
    if args.data.is_dir():
        source = DogsVsCats(args.data, progress=False)
        files = [(path, label) for path, label in source.samples]
        classes = source.classes
    else:  # no photos on this machine: random JPEGs of photo-like size
        rng = np.random.default_rng(0)
        classes = ["cats", "dogs"]
        files = []
        for i in range(64):
            path = folder / "generated" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
            files.append((path, i % 2))
    samples = []
    for i in range(args.images):
        path, label = files[i % len(files)]
        copy = folder / classes[label] / f"{i:06d}{path.suffix}"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy)
        samples.append((copy, label))
    return ImageList(samples, classes, transform=vt.imagenet_transform(size=args.size))


_TEMPLATE: list[nn.Module] = []


def build_model(device: torch.device) -> nn.Module:
    """VGG16_bn with the recipe's head, the same initial weights every call."""
    if not _TEMPLATE:  # initialising 138M weights takes seconds on a CPU: do it once
        torch.manual_seed(0)
        _TEMPLATE.append(vt.replace_classifier(vt.create_model("vgg16_bn", weights=None), 2))
    return copy.deepcopy(_TEMPLATE[0]).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seed_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    device: torch.device,
    epochs: int,
) -> list[float]:
    """The seed's plain loop, in strict fp32: seconds per epoch."""
    loss_fn = nn.CrossEntropyLoss()
    times = []
    with strict_fp32():
        for _ in range(epochs):
            sync(device)
            started = time.perf_counter()
            model.train()
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                loss = loss_fn(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            sync(device)
            times.append(time.perf_counter() - started)
    return times


def seed_recipe(data: ImageList, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """The seed's loop: requires_grad=False on features, Adam on the head, fp32, every epoch in full."""
    torch.manual_seed(0)
    model = build_model(device)
    for param in model.features.parameters():
        param.requires_grad = False
    optimizer = torch.optim.Adam(model.classifier.parameters(), lr=1e-3)
    # The seed's own preprocessing: torchvision's classic transforms, resizing with Pillow.
    resize = max(args.size, round(args.size * 256 / 224))
    seed_transform = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(args.size),
            transforms.ToTensor(),
            transforms.Normalize(vt.IMAGENET_MEAN, vt.IMAGENET_STD),
        ]
    )
    loader = DataLoader(
        data.with_transform(seed_transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers(args),
        pin_memory=device.type == "cuda",
    )
    reset_peak(device)
    started = time.perf_counter()
    epoch_times = seed_epochs(model, optimizer, loader, device, args.epochs)
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "epoch_img_s": len(data) / float(np.median(epoch_times)),
        "peak_mem_gb": peak_gb(device),
    }


def vggtransfer_recipe(
    data: ImageList, args: argparse.Namespace, device: torch.device, folder: Path, *, compiled: bool
) -> dict[str, float]:
    """The same recipe through vt.Trainer: features cached once, fused Adam, bf16 + NHWC on GPUs."""
    torch.manual_seed(0)
    model = vt.freeze_features(build_model(device))
    trainer = vt.Trainer(
        model,
        device=device,
        seed=0,
        progress=False,
        cache_dir=folder / "cache",
        compile_features=compiled,
    )
    reset_peak(device)
    sync(device)
    started = time.perf_counter()
    trainer.fit(data, epochs=1, batch_size=args.batch_size, num_workers=workers(args))
    sync(device)
    first_epoch = time.perf_counter() - started
    trainer.fit(data, epochs=args.epochs, batch_size=args.batch_size, num_workers=workers(args))
    sync(device)
    wall = time.perf_counter() - started
    saved = time.perf_counter()
    trainer.save_checkpoint(folder / "checkpoint.pt", head_only=False, training_state=False)
    save_s = time.perf_counter() - saved
    epoch_times = [record["time_s"] for record in trainer.history.records]
    head_epoch = float(np.median(epoch_times[1:] or epoch_times))
    feature_pass = first_epoch - epoch_times[0]  # the first fit = one feature pass + one head epoch
    return {
        "wall_s": wall,
        "feature_pass_img_s": len(data) / feature_pass,
        "head_epoch_img_s": len(data) / head_epoch,
        "checkpoint_save_s": save_s,
        "peak_mem_gb": peak_gb(device),
        "cached": trainer.cache_report.get("fit(train)", ""),
        "precision": trainer.precision.name,
    }


def fine_tune_tensors(data: ImageList, args: argparse.Namespace) -> TensorDataset:
    """Preprocessed images for the fine-tuning measurement, decoded once: it times compute only."""
    count = min(len(data), args.batch_size * args.fine_tune_steps)
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=workers(args))
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images.append(batch_images)
        labels.append(batch_labels)
        if sum(len(b) for b in labels) >= count:
            break
    return TensorDataset(torch.cat(images)[:count], torch.cat(labels)[:count])


def fine_tune(
    data: TensorDataset, args: argparse.Namespace, device: torch.device, *, compiled: bool | None
) -> dict[str, float]:
    """Images per second training every layer, second of two epochs over the same tensors.

    ``compiled=None``: the seed's loop, fp32 (strict on CUDA: no TF32), plain Adam. Otherwise
    ``Trainer.fit`` with its defaults (fused Adam; bf16 and channels_last on CUDA) and
    ``compile_model=compiled``. The first epoch warms up (and compiles) and is not counted.
    """
    model = build_model(device)
    reset_peak(device)
    if compiled is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, pin_memory=device.type == "cuda")
        epoch_s = seed_epochs(model, optimizer, loader, device, 2)
        return {"img_s": len(data) / epoch_s[-1], "peak_mem_gb": peak_gb(device)}
    trainer = vt.Trainer(model, lr=1e-4, device=device, seed=0, progress=False, compile_model=compiled)
    trainer.fit(data, epochs=2, batch_size=args.batch_size, num_workers=0)
    return {
        "img_s": len(data) / trainer.history.records[-1]["time_s"],
        "peak_mem_gb": peak_gb(device),
        "first_epoch_s": trainer.history.records[0]["time_s"],
    }


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """The seed recipe's arithmetic: fp32 convolutions and matmuls, no TF32 (CUDA's conv default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def bf16_matmul_tflops(device: torch.device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 20 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def workers(args: argparse.Namespace) -> int:
    return default_workers() if args.workers is None else args.workers


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; process-wide


def main() -> int:
    args = parse_args()
    device = resolve_device(args.device)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {torch.get_num_threads()} threads"
    )
    print(f"device: {machine}; torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(
        f"VGG16_bn, {args.images} images, {args.size} px, batch {args.batch_size}, {args.epochs} epochs, "
        f"{workers(args)} loader workers"
    )
    # --compile measures vggtransfer both ways in the same run: eager first, then compiled.
    variants = {"vggtransfer": False, **({"vggtransfer_compiled": True} if args.compile else {})}
    results: dict[str, Any] = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = make_dataset(args, folder)
        results["seed"] = seed_recipe(data, args, device)
        print(f"seed recipe done: {results['seed']['wall_s']:.1f}s", flush=True)
        for name, compiled in variants.items():
            results[name] = vggtransfer_recipe(data, args, device, folder / name, compiled=compiled)
            print(f"{name} done: {results[name]['wall_s']:.1f}s", flush=True)
        tensors = fine_tune_tensors(data, args)
        results["fine_tune_seed"] = fine_tune(tensors, args, device, compiled=None)
        for name, compiled in variants.items():
            results[f"fine_tune_{name}"] = fine_tune(tensors, args, device, compiled=compiled)
    if device.type == "cuda":
        results["bf16_matmul_tflops"] = bf16_matmul_tflops(device)
    print_table(results, args, device, list(variants))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def print_table(
    results: dict[str, Any], args: argparse.Namespace, device: torch.device, variants: list[str]
) -> None:
    """The Markdown table: one block for the seed, one per vggtransfer variant."""
    flops = VGG16_BN_FLOPS_224 * (args.size / 224) ** 2
    seed, seed_tune = results["seed"], results["fine_tune_seed"]
    strict = "strict fp32" if device.type == "cuda" else "fp32"
    rows: list[tuple[str, str, float | None]] = [
        (
            "seed: frozen-features epoch (features recomputed)",
            f"{seed['epoch_img_s']:.1f} img/s",
            seed["epoch_img_s"] * flops,
        ),
        (f"seed: {args.epochs}-epoch frozen run, wall", f"{seed['wall_s']:.1f} s", None),
        (
            f"seed: full fine-tuning ({strict})",
            f"{seed_tune['img_s']:.1f} img/s",
            seed_tune["img_s"] * 3 * flops,
        ),
    ]
    for name in variants:
        ours, tune = results[name], results[f"fine_tune_{name}"]
        label = f"vggtransfer ({ours['precision']}{', compiled' if name.endswith('compiled') else ''})"
        rows += [
            (
                f"{label}: one feature pass (cached)",
                f"{ours['feature_pass_img_s']:.1f} img/s",
                ours["feature_pass_img_s"] * flops,
            ),
            (f"{label}: head epoch on cached features", f"{ours['head_epoch_img_s']:.0f} img/s", None),
            (
                f"{label}: {args.epochs}-epoch frozen run, wall (caching included)",
                f"{ours['wall_s']:.1f} s",
                None,
            ),
            (f"{label}: **speed-up of the frozen run**", f"{seed['wall_s'] / ours['wall_s']:.1f}x", None),
            (f"{label}: full fine-tuning", f"{tune['img_s']:.1f} img/s", tune["img_s"] * 3 * flops),
            (
                f"{label}: **speed-up of full fine-tuning**",
                f"{tune['img_s'] / seed_tune['img_s']:.1f}x",
                None,
            ),
            (
                f"{label}: peak memory, frozen run (seed: {seed['peak_mem_gb']:.2f} GB)",
                f"{ours['peak_mem_gb']:.2f} GB",
                None,
            ),
            (f"{label}: checkpoint save", f"{ours['checkpoint_save_s']:.2f} s", None),
        ]
    matmul = results.get("bf16_matmul_tflops")
    print()
    print("| phase | measured | TFLOP/s (share of bf16 matmul) |")
    print("| --- | --- | --- |")
    for name, value, rate in rows:
        share = f" ({rate / 1e12 / matmul:.0%})" if matmul and rate else ""
        print(f"| {name} | {value} | {'' if rate is None else f'{rate / 1e12:.2f}{share}'} |")
    if matmul:
        print(f"| bf16 matmul, 8192^3 | {matmul:.0f} TFLOP/s | 100% |")
    print(f"\nfeature caching: {results['vggtransfer']['cached']}")


if __name__ == "__main__":
    sys.exit(main())
