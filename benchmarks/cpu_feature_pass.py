"""The frozen feature pass on a CPU, fp32 against bf16, next to the CPU's own matmul rates.

    python benchmarks/cpu_feature_pass.py                 # VGG16_bn, 112 and 224 px, batch 32

For each dtype it measures, in the same run:

- the matmul rate: 1024 x 1024 products, repeated for two seconds (GFLOP/s);
- the feature pass: the frozen VGG16_bn up to its head (what feature caching computes once), on
  preprocessed images, in evaluation mode without gradients (images/s and GFLOP/s, and that as
  a share of the matmul rate of the same dtype);
- how far bf16 moves the result: the relative difference of the bf16 features from the fp32
  ones, and, with --data, whether a head trained on fp32 features predicts the same classes of
  real photos from bf16 features (the agreement and both accuracies).

It also reports whether the CPU has native bf16 arithmetic (AVX512-BF16 or AMX in
/proc/cpuinfo): without it, bf16 is emulated and slower. Weights are random unless --weights
names a file: the speed is the same, and the agreement is a lower bound of what pretrained
features give. Writes --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vggtransfer as vt
from vggtransfer.data import DogsVsCats, ImageList, stratified_split

PETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford-pets-sample"
# VGG16_bn's forward cost at 224 px from torchvision's metadata (GFLOPS counts multiply-adds).
VGG16_BN_FLOPS_224 = 2 * 15.47e9
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per size and dtype")
    parser.add_argument(
        "--matmul-seconds", type=float, default=2.0, help="how long each matmul rate is timed"
    )
    parser.add_argument("--weights", default=None, help="a local VGG16_bn weights file")
    parser.add_argument("--data", type=Path, default=PETS, help="photos for the agreement check")
    parser.add_argument("--agreement-images", type=int, default=None, help="photos used (default: all)")
    parser.add_argument("--agreement-size", type=int, default=None, help="crop size (default: the smallest)")
    parser.add_argument("--out", type=Path, default=Path("cpu_feature_pass.json"))
    return parser.parse_args()


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {
        flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":")[1].split()
    }


def matmul_rate(dtype: torch.dtype, size: int = 1024, seconds: float = 2.0) -> float:
    """GFLOP/s of square matrix products of ``dtype``, repeated for about ``seconds``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    repeats, started = 0, time.perf_counter()
    while repeats == 0 or time.perf_counter() - started < seconds:
        torch.mm(a, b)
        repeats += 1
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def backbone(weights: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = vt.freeze_features(vt.create_model("vgg16_bn", weights=weights))
    model.classifier = nn.Identity()  # the head's input: what feature caching stores
    return model.eval()


def features(model: nn.Module, images: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(images).float()


def feature_pass_rate(model: nn.Module, size: int, batch: int, repeats: int, bf16: bool) -> float:
    images = torch.randn(batch, 3, size, size)
    features(model, images, bf16)  # warm-up (oneDNN picks its kernels)
    started = time.perf_counter()
    for _ in range(repeats):
        features(model, images, bf16)
    return batch * repeats / (time.perf_counter() - started)


def agreement(model: nn.Module, folder: Path, size: int, images: int | None) -> dict[str, Any]:
    """Train a head on fp32 features of real photos; compare its predictions from bf16 features."""
    data = DogsVsCats(folder, transform=vt.imagenet_transform(size=size), progress=False)
    if images is not None:  # an even spread over the sorted files: both classes
        step = max(1, len(data) // images)
        kept = data.samples[::step][:images]
        data = ImageList(kept, data.classes, transform=data.transform)
    split = stratified_split(data, 0.2, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    rows = {True: [], False: []}
    labels = []
    for images, targets in loader:
        labels.append(targets)
        for bf16 in (False, True):
            rows[bf16].append(features(model, images, bf16))
    fp32, bf16 = torch.cat(rows[False]), torch.cat(rows[True])
    labels_all = torch.cat(labels)
    train, val = list(split.train), list(split.val)
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(fp32.shape[1], 500), nn.ReLU(), nn.Dropout(0.3), nn.Linear(500, 2))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    scale = fp32[train].std()
    for _ in range(30):
        for start in range(0, len(train), 32):
            chosen = train[start : start + 32]
            loss = nn.functional.cross_entropy(head(fp32[chosen] / scale), labels_all[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.eval()
    with torch.no_grad():
        from_fp32 = head(fp32[val] / scale).argmax(1)
        from_bf16 = head(bf16[val] / scale).argmax(1)
    truth = labels_all[val]
    return {
        "photos": len(data),
        "val_photos": len(val),
        "relative_feature_difference": float((bf16 - fp32).norm() / fp32.norm()),
        "prediction_agreement": float((from_fp32 == from_bf16).float().mean()),
        "val_accuracy_fp32_features": float((from_fp32 == truth).float().mean()),
        "val_accuracy_bf16_features": float((from_bf16 == truth).float().mean()),
    }


def main() -> int:
    args = parse_args()
    flags = cpu_flags()
    model = backbone(args.weights)
    rates = {name: matmul_rate(dtype, seconds=args.matmul_seconds) for name, dtype in DTYPES.items()}
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": sorted(flags & set(NATIVE_BF16_FLAGS)),
        "torch": torch.__version__,
        "weights": args.weights or "random",
        "matmul_gflops": {k: round(v, 1) for k, v in rates.items()},
        "feature_pass": [],
    }
    for size in args.sizes:
        for name in ("fp32", "bf16"):
            per_second = feature_pass_rate(model, size, args.batch_size, args.repeats, name == "bf16")
            achieved = per_second * VGG16_BN_FLOPS_224 * (size / 224) ** 2 / 1e9
            results["feature_pass"].append(
                {
                    "size": size,
                    "dtype": name,
                    "images_per_s": round(per_second, 2),
                    "gflops": round(achieved, 1),
                    "share_of_matmul_rate": round(achieved / rates[name], 3),
                }
            )
            print(results["feature_pass"][-1], flush=True)
    if args.data.is_dir():
        size = args.agreement_size or min(args.sizes)
        results["agreement"] = {"size": size, **agreement(model, args.data, size, args.agreement_images)}
        print(results["agreement"], flush=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nnative bf16: {results['native_bf16'] or 'none'}; matmul GFLOP/s: {results['matmul_gflops']}")
    print("| size | dtype | images/s | GFLOP/s | share of the matmul rate |")
    print("| --- | --- | --- | --- | --- |")
    for row in results["feature_pass"]:
        print(
            f"| {row['size']} | {row['dtype']} | {row['images_per_s']} | {row['gflops']} | "
            f"{100 * row['share_of_matmul_rate']:.0f}% |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
