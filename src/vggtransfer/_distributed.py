"""Running under ``torchrun``: detecting the launch, joining the process group, rank-0 duties.

``torchrun --nproc_per_node=N script.py`` starts N copies of the script with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. The Trainer reads them,
joins the process group (NCCL on CUDA, Gloo on CPU), pins each process to its local GPU, and
from then on every collective operation goes through the helpers here, which are no-ops in a
single process. Nothing else in vggtransfer needs to know whether it runs distributed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistributedEnv",
    "all_reduce_sum",
    "barrier",
    "broadcast_int",
    "broadcast_state",
    "detect",
    "gather_rows",
    "is_main_process",
    "join",
    "rank_and_world",
]

_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place in a ``torchrun`` launch."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0, the process that writes files and prints."""
        return self.rank == 0


def detect(environ: Mapping[str, str] | None = None) -> DistributedEnv | None:
    """The launch described by the environment, or None for a plain single process.

    Raises:
        RuntimeError: the environment is half-configured (some launch variables set, others
            missing or malformed); the message names them and shows how to launch.
    """
    env = os.environ if environ is None else environ
    present = [name for name in _LAUNCH_VARIABLES if name in env]
    if not present:
        return None
    missing = [name for name in _LAUNCH_VARIABLES if name not in env]
    world = env.get("WORLD_SIZE", "")
    if not missing and world.isdigit() and int(world) > 1:
        missing = [name for name in _RENDEZVOUS_VARIABLES if not env.get(name)]
    if missing:
        raise RuntimeError(
            f"vggtransfer: the environment looks like a distributed launch ({', '.join(f'{n}={env[n]}' for n in present)}) "
            f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Launch with torchrun, "
            f"which sets all of them: torchrun --nproc_per_node=2 script.py ...; or unset "
            f"{', '.join(present)} to run as a single process"
        )
    try:
        rank, world_size, local_rank = (int(env[name]) for name in _LAUNCH_VARIABLES)
    except ValueError:
        raise RuntimeError(
            f"vggtransfer: expected RANK, WORLD_SIZE and LOCAL_RANK to be integers but got "
            f"{', '.join(f'{n}={env[n]!r}' for n in _LAUNCH_VARIABLES)}"
        ) from None
    if not (0 <= rank < world_size and 0 <= local_rank < world_size):
        raise RuntimeError(
            f"vggtransfer: expected 0 <= RANK < WORLD_SIZE and 0 <= LOCAL_RANK < WORLD_SIZE but got "
            f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}"
        )
    return DistributedEnv(rank, world_size, local_rank)


def join(env: DistributedEnv, device: torch.device) -> None:
    """Join the process group once: NCCL for CUDA devices, Gloo otherwise."""
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a distributed run: the one that should print and write.

    Example:
        >>> import vggtransfer as vt
        >>> vt.is_main_process()
        True
    """
    if active():
        return dist.get_rank() == 0
    env = detect()
    return env is None or env.is_main


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; unchanged in a single process."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every process (after rank 0 wrote a file the others may read)."""
    if active():
        dist.barrier()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``, ``(0, 1)`` in a single process."""
    if active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every process (63 bits: the range of seeds)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor[0])


def broadcast_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every process's ``module``, in place."""
    if active():
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble rows sharded as ``range(rank, total, world)`` into one ``[total, ...]`` tensor.

    Every process gets the whole tensor. Shards are padded to equal length for the collective
    and the padding is dropped again.
    """
    if not active():
        return local
    world = dist.get_world_size()
    per_rank = -(-total // world)
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    # Row i of the whole came from rank i % world, where it was row i // world.
    stacked = torch.stack(pieces, dim=1).reshape(per_rank * world, *local.shape[1:])
    return stacked[:total]
