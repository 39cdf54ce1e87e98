"""Wall time of a whole frozen-features run: JPEG files on disk to a saved checkpoint.

    python benchmarks/end_to_end.py --device cuda --files 25000 --epochs 10      # issue 5's target: < 20 s
    python benchmarks/end_to_end.py --files 400 --image-size 64 --epochs 3       # a quick CPU run

First writes a Kaggle-layout folder (cat.N.jpg / dog.N.jpg) of ``--files`` JPEGs of Dogs-vs-Cats
size (at most 500 px a side, quality 75, about 20-40 kB), made from the photos in ``--photos``
(the Oxford-IIIT Pet sample by default) or, without photos, from smooth synthetic images. Then,
in this process, timed from before ``import torch``: scan every file (the dirty-data report),
split 80/20, build VGG16_bn (random weights: speed does not depend on them), freeze it, train the
head for ``--epochs`` epochs with validation (features cached once), and save a head-only
checkpoint. Prints the time of each phase and writes them to ``--out`` as JSON.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: they are part of a user's wall time

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

PETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford-pets-sample"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=25000, help="JPEG files in the data folder")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arch", default="vgg16_bn")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: cores - 1)")
    parser.add_argument("--compile", action="store_true", help="compile the feature pass (timed too)")
    parser.add_argument("--photos", type=Path, default=PETS, help="photos to make the files from")
    parser.add_argument("--folder", type=Path, default=None, help="where to write the files (default: temp)")
    parser.add_argument("--out", type=Path, default=Path("end_to_end.json"))
    return parser.parse_args()


def source_images(photos: Path, count: int = 64) -> list[Image.Image]:
    """Photos shrunk to Dogs-vs-Cats size, or smooth synthetic images when there are none."""
    files = (
        sorted(p for p in photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if photos.is_dir() else []
    )
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((500, 500))
                images.append(image)
        except OSError:  # the sample's deliberately broken files
            continue
    if images:
        return images
    rng = np.random.default_rng(0)
    for _ in range(count):  # low-frequency noise, upsampled: compresses like a photo, unlike white noise
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC))
    return images


def write_folder(folder: Path, files: int, photos: Path) -> int:
    """``files`` JPEGs named like Kaggle's train/ (half cats, half dogs); returns their total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = []
    for i, image in enumerate(source_images(photos)):
        path = folder / f"pool-{i}.jpg"
        image.save(path, quality=75)
        pool.append(path)
    total = 0
    for i in range(files):
        target = folder / f"{('cat', 'dog')[i % 2]}.{i // 2}.jpg"
        shutil.copyfile(pool[i % len(pool)], target)  # separate files, as a real data set has
        total += target.stat().st_size
    for path in pool:
        path.unlink()
    return total


def run(args: argparse.Namespace, folder: Path) -> dict[str, float | str]:
    timings: dict[str, float | str] = {}
    mark = STARTED

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = now - mark
        mark = now

    import torch

    import vggtransfer as vt
    from vggtransfer.data import DogsVsCats, stratified_split

    lap("import_s")
    data = DogsVsCats(folder, progress=False)
    lap("scan_s")
    split = stratified_split(data, 0.2, seed=0)
    transform = vt.imagenet_transform(size=args.image_size)
    train, val = split.subsets(data.with_transform(transform))
    model = vt.replace_classifier(vt.freeze_features(vt.create_model(args.arch, weights=None)), 2)
    trainer = vt.Trainer(
        model,
        device=args.device,
        seed=0,
        progress=False,
        class_names=data.classes,
        transform=transform,
        cache_dir=folder / "feature-cache",
        compile_features=args.compile,
    )
    lap("model_s")
    trainer.fit(train, val, epochs=args.epochs, batch_size=args.batch_size, num_workers=args.workers)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    lap("fit_s")
    trainer.save_checkpoint(folder / "checkpoint.pt")
    lap("checkpoint_s")
    epochs = [record["time_s"] for record in trainer.history.records]
    timings["total_s"] = mark - STARTED
    timings["feature_pass_s"] = float(timings["fit_s"]) - sum(epochs)  # fit = features once + epochs
    timings["epoch_median_s"] = float(np.median(epochs))
    timings["val_accuracy"] = trainer.history.records[-1]["val_accuracy"]
    timings["device"] = (
        torch.cuda.get_device_name(trainer.device)
        if trainer.device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    timings["cached"] = trainer.cache_report.get("fit(train)", "")
    timings["precision"] = trainer.precision.name
    return timings


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "train"
        prepared = time.perf_counter()
        size = write_folder(folder, args.files, args.photos)
        prepare_s = time.perf_counter() - prepared
        global STARTED
        STARTED += prepare_s  # writing the files is set-up, not part of the run
        result = run(args, folder)
    result.update(files=args.files, megabytes=size / 1e6, prepare_s=prepare_s, cores=os.cpu_count() or 0)
    print(
        f"{args.files} JPEGs ({size / 1e6:.0f} MB), {args.arch}, {args.image_size} px, {args.epochs} epochs"
    )
    print(f"device {result['device']}, precision {result['precision']}; caching {result['cached']}")
    print("| phase | seconds |")
    print("| --- | --- |")
    for name in (
        "import_s",
        "scan_s",
        "model_s",
        "feature_pass_s",
        "epoch_median_s",
        "fit_s",
        "checkpoint_s",
    ):
        print(f"| {name[:-2].replace('_', ' ')} | {float(result[name]):.2f} |")
    print(f"| **files on disk to saved checkpoint** | **{float(result['total_s']):.2f}** |")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
