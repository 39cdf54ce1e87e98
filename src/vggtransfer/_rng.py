"""Capturing and restoring random number generator states as plain data and tensors.

Checkpoints must load with ``weights_only=True``, which rejects NumPy arrays and arbitrary
objects, so each state is stored as tensors, ints and lists.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch

__all__ = ["capture_rng", "epoch_rng", "preserved_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """The states of torch (CPU and every CUDA device), Python's ``random`` and NumPy."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured; CUDA states only where the devices exist."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch, derived from the run's seed: the same epoch always gets the same one."""
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


@contextlib.contextmanager
def epoch_rng(seed: int, epoch: int, device: torch.device) -> Iterator[None]:
    """Run an epoch with torch's global generator seeded from ``(seed, epoch)``, then put it back.

    Dropout masks and random augmentation in the main process then depend only on the run's
    seed and the epoch number, so training k epochs, saving, and resuming in a new process
    reproduces the uninterrupted run bit for bit, and the caller's own random stream is left
    as it was.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type != "cpu" else "cuda"):
        torch.manual_seed(epoch_seed(seed, epoch))
        yield


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block, then put every generator :func:`capture_rng` knows back as it was."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)
