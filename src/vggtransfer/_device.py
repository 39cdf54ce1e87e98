"""Choosing the device and the numeric precision, once, in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["Precision", "PrecisionName", "resolve_device", "resolve_precision"]

PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``"auto"`` into CUDA, then Apple MPS, then CPU; check that an explicit device exists.

    Raises:
        ValueError: the device string is not understood, or names a device this machine lacks.
    """
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"Trainer: expected device to be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device "
            f"but got {device!r}"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"Trainer: device {device!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}); use device='auto' or device='cpu'"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"Trainer: device {device!r} was requested but MPS is not available; use device='auto'"
        )
    return resolved


@dataclass(frozen=True)
class Precision:
    """How forward passes run: autocast dtype (or none) and whether gradients need scaling.

    fp32 is expressed as an autocast that is switched off and a scaler that is disabled, so the
    training loop has no precision branches: it always enters :meth:`autocast` and always goes
    through :attr:`scaler`.
    """

    name: Literal["fp32", "bf16", "fp16"]
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32."""
        return _DTYPES.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """A context for forward passes: autocast in bf16/fp16, a no-op in fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled only for fp16 (bf16 has fp32's range and needs none)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Turn ``"auto"`` into bf16 on CUDA GPUs that support it and fp32 everywhere else.

    Raises:
        ValueError: ``precision`` is not one of the names, or fp16 was asked for on the CPU.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(
            f"Trainer: expected precision to be 'auto', 'fp32', 'bf16' or 'fp16' but got {precision!r}"
        )
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return Precision("bf16" if bf16_ok else "fp32", device.type)
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("Trainer: precision='fp16' needs a GPU; on the CPU use 'bf16' (autocast) or 'fp32'")
    return Precision(precision, device.type)  # type: ignore[arg-type]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
