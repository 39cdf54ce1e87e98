"""Small, learnable, deterministic data and models for Trainer tests (also used by subprocesses)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import vggtransfer as vt


def blobs(n: int = 48, size: int = 32, seed: int = 0) -> TensorDataset:
    """Two classes a VGG can tell apart at 32 px: warm versus cool images, with noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    colour = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1) * (labels.float() * 2 - 1).view(-1, 1, 1, 1)
    images = colour + torch.randn(n, 3, size, size, generator=generator)
    return TensorDataset(images, labels)


class Jitter:
    """A random transform that says so (``deterministic = False``), as any transform may."""

    deterministic = False

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        flipped = image.flip(-1) if torch.rand(()) < 0.5 else image
        return flipped + 0.3 * torch.randn_like(image)


class Augmented(Dataset):
    """:func:`blobs` through :class:`Jitter`, counting its reads.

    With a ``folder``, it also lists one small file per sample as ``samples``, as ImageFolder
    does: that makes its features fingerprintable, so the Trainer keeps them in its cache.
    """

    def __init__(self, n: int = 24, seed: int = 0, folder: Path | None = None) -> None:
        self.base, self.transform, self.reads = blobs(n, seed=seed), Jitter(), 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i}.bin").write_bytes(bytes([i]))
            self.samples = [(str(folder / f"{i}.bin"), i % 2) for i in range(n)]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        self.reads += 1
        image, label = self.base[index]
        return self.transform(image), label


class Named(Dataset):
    """A dataset with ImageFolder's ``classes`` attribute."""

    def __init__(self, inner: Dataset, classes: list[str]) -> None:
        self.inner, self.classes = inner, classes

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return self.inner[index]


_BUILT: dict[tuple[str, int], nn.Module] = {}


def vgg(arch: str = "vgg11_bn", *, num_classes: int = 2, seed: int = 0) -> nn.Module:
    """A frozen VGG with the recipe's head, identically initialised for the same seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if (arch, seed) not in _BUILT:  # building VGG initialises 130M weights: do it once
            _BUILT[arch, seed] = vt.create_model(arch, weights=None)
        model = copy.deepcopy(_BUILT[arch, seed])
        torch.manual_seed(seed)  # the head's initialisation must not depend on the cache above
        return vt.replace_classifier(vt.freeze_features(model), num_classes)


class ToyVGG(nn.Module):
    """VGG's layout (``features`` with BatchNorm, ``avgpool``, a ``classifier`` of Linear layers) at toy size.

    For tests about the loop rather than about VGG: a step takes milliseconds instead of VGG11's
    25088-wide head, and every vggtransfer function sees the same structure.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def toy(*, num_classes: int = 2, seed: int = 0) -> nn.Module:
    """A frozen :class:`ToyVGG` with the recipe's head, identically initialised for the same seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return vt.replace_classifier(vt.freeze_features(ToyVGG()), num_classes)


def trainer(model: nn.Module | None = None, **kwargs) -> vt.Trainer:
    """A quiet CPU Trainer with fixed seed and class names, on :func:`toy` unless a model is given."""
    options = {"device": "cpu", "seed": 1234, "progress": False, "class_names": ["cool", "warm"]}
    options.update(kwargs)
    return vt.Trainer(model if model is not None else toy(), **options)


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under torchrun on loopback, without launch variables leaking in from outside."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        script,
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
