"""Where and how the steps run: device, torchrun launch, precision, memory layout, wrappers.

Everything that depends on the machine is decided once, when the Trainer is built, and held by a
:class:`Runtime`. The loop then asks it to move a batch, open an autocast region, wrap a module
for DDP or ``torch.compile``, or average a number over processes, and never branches on the
device itself.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from ._distributed import all_reduce_sum, broadcast_int, broadcast_state, detect, join, rank_and_world

__all__ = [
    "Precision",
    "PrecisionName",
    "Runtime",
    "cpu_has_native_bf16",
    "eval_mode",
    "resolve_device",
    "resolve_precision",
    "unwrap",
]

M = TypeVar("M", bound=nn.Module)

PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device, caller: str = "Trainer") -> torch.device:
    """Turn ``"auto"`` into CUDA, then Apple MPS, then CPU; check that an explicit device exists.

    ``caller`` names the public function in error messages.

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
            f"{caller}: expected device to be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device "
            f"but got {device!r}"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{caller}: device {device!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}); use device='auto' or device='cpu'"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"{caller}: device {device!r} was requested but MPS is not available; use device='auto'"
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


#: x86 CPU flags of native bf16 arithmetic; without them torch emulates bf16, far slower than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this x86 CPU computes in bf16 natively (AVX512-BF16 or AMX); None when unknown."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:  # not Linux, or no /proc: nothing to go by
        return None
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}
    if not flags:  # ARM and others list "Features", not x86 flags
        return None
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


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
    if precision == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        # Measured on a 2-core AVX2 machine: VGG16_bn's feature pass ran 15-95x slower in bf16.
        warnings.warn(
            "Trainer: precision='bf16' on a CPU without native bf16 arithmetic (no AVX512-BF16 or AMX "
            "in /proc/cpuinfo): torch emulates it, many times slower than fp32. HINT: use "
            "precision='fp32' (what 'auto' picks on CPUs)",
            UserWarning,
            stacklevel=4,  # the line that built the Trainer (via Runtime.start)
        )
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


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


@dataclass(frozen=True)
class Runtime:
    """The machine-dependent choices of one Trainer, and the operations that depend on them.

    Attributes:
        device: Where the model and batches live.
        precision: Autocast dtype and gradient scaling.
        channels_last: Whether 4-d batches and convolution weights use the NHWC layout.
        compile_model: Whether training and evaluation steps go through ``torch.compile``.
        rank: This process's rank under torchrun (0 alone).
        world_size: Number of processes (1 alone).
    """

    device: torch.device
    precision: Precision
    channels_last: bool
    compile_model: bool
    rank: int = 0
    world_size: int = 1

    @classmethod
    def start(
        cls,
        *,
        device: str | torch.device,
        precision: PrecisionName,
        channels_last: bool | Literal["auto"],
        compile_model: bool,
    ) -> Runtime:
        """Resolve the choices and set the process up: pick the GPU, join torchrun's group.

        Raises:
            ValueError: a device or precision this machine does not have, or a half-configured
                torchrun environment.
            TypeError: ``channels_last`` or ``compile_model`` is not a bool.
        """
        if channels_last != "auto" and not isinstance(channels_last, bool):
            raise TypeError(
                f"Trainer: expected channels_last to be 'auto', True or False but got {channels_last!r}"
            )
        if not isinstance(compile_model, bool):
            raise TypeError(f"Trainer: expected compile_model to be True or False but got {compile_model!r}")
        launch = detect()
        resolved = resolve_device(device)
        if launch is not None and resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", launch.local_rank)  # one GPU per process
        resolved_precision = resolve_precision(precision, resolved)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        if launch is not None:
            join(launch, resolved)
        rank, world_size = rank_and_world()
        # channels_last (NHWC) is what tensor cores want for convolutions; on CPUs it rarely helps.
        nhwc = resolved.type == "cuda" if channels_last == "auto" else channels_last
        return cls(resolved, resolved_precision, nhwc, compile_model, rank, world_size)

    def place(self, model: M) -> M:
        """Move ``model`` here, in place: to the device, rank 0's weights, NHWC if configured."""
        model.to(self.device)
        # Every process starts from rank 0's weights, whatever its own initialisation was.
        broadcast_state(unwrap(model))
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device (asynchronously from pinned memory), NHWC if configured."""
        if self.channels_last and inputs.ndim == 4:
            return inputs.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return inputs.to(self.device, non_blocking=True)

    @property
    def pin_memory(self) -> bool:
        """Whether loaders should pin batches (for asynchronous copies to a GPU)."""
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward-pass context of :attr:`precision`."""
        return self.precision.autocast()

    def wrap(self, module: nn.Module, *, training: bool) -> nn.Module:
        """What computes a step's logits: DDP-wrapped for training under torchrun, compiled if asked."""
        if training and self.world_size > 1:
            # Built per fit, so that it covers exactly the parameters that train now (after an
            # unfreeze, the features too); frozen parameters are left out by DDP itself.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        if self.compile_model:
            # fallback_random: dropout draws the same random numbers as without compiling, so the
            # results match eager ones within float tolerance and resuming stays bit-exact.
            # torch.compile caches the generated code per module, so later fits reuse it.
            module = torch.compile(module, options={"fallback_random": True})  # type: ignore[assignment]
        return module

    def sum_across(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes, in place; unchanged in a single process."""
        return all_reduce_sum(tensor)

    def all_agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every process (a collective: all must call it)."""
        if self.world_size == 1:
            return ok
        flags = all_reduce_sum(torch.tensor([0.0 if ok else 1.0], device=self._collective_device))
        return float(flags[0]) == 0.0

    def agree_on(self, value: int) -> int:
        """Rank 0's ``value``, on every process (a collective: all must call it)."""
        if self.world_size == 1:
            return value
        return broadcast_int(value, self._collective_device)

    @property
    def _collective_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; Gloo CPU ones.
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def mean_across(self, value: torch.Tensor) -> float:
        """The mean of a scalar tensor over all processes, as a float (one device sync)."""
        total = all_reduce_sum(value.detach().float().reshape(1).clone())
        return float(total[0]) / self.world_size
