"""Process group setup for `torchrun` (DistributedDataParallel), and the few collectives the
training loop needs. One process per device; without torchrun (WORLD_SIZE unset or 1) everything
here is a no-op on a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from .errors import TrainError


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DistributedEnvError(TrainError):
    """The torchrun environment variables are inconsistent."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as err:
        raise DistributedEnvError(f"environment {name}: expected an int, got {value!r}") from err


def read_environment() -> Tuple[int, int, int]:
    """(world_size, rank, local_rank) from the torchrun variables, checked: WORLD_SIZE >= 1,
    0 <= RANK < WORLD_SIZE, 0 <= LOCAL_RANK (< LOCAL_WORLD_SIZE when set), RANK and LOCAL_RANK
    only with WORLD_SIZE, MASTER_ADDR and MASTER_PORT with WORLD_SIZE > 1. A process launched
    with part of the variables would otherwise train alone (or divide by zero) and write nothing
    as a rank other than 0."""
    hint = "launch with torchrun, or unset the variable for one process"
    if "WORLD_SIZE" not in os.environ:
        for name in ("RANK", "LOCAL_RANK"):
            if _env_int(name, 0) != 0:
                raise DistributedEnvError(
                    f"environment {name}={os.environ[name]} without WORLD_SIZE: {hint}"
                )
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise DistributedEnvError(f"environment WORLD_SIZE: expected >= 1, got {world_size}")
    rank = _env_int("RANK", 0)
    if not 0 <= rank < world_size:
        raise DistributedEnvError(
            f"environment RANK: expected 0 <= RANK < WORLD_SIZE ({world_size}), got {rank}"
        )
    local_rank = _env_int("LOCAL_RANK", 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if local_size < 1:
        raise DistributedEnvError(f"environment LOCAL_WORLD_SIZE: expected >= 1, got {local_size}")
    if not 0 <= local_rank < local_size:
        raise DistributedEnvError(
            f"environment LOCAL_RANK: expected 0 <= LOCAL_RANK < "
            f"LOCAL_WORLD_SIZE ({local_size}), got {local_rank}"
        )
    if world_size > 1:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise DistributedEnvError(
                f"environment {' and '.join(missing)}: not set, needed "
                f"with WORLD_SIZE={world_size} to join the process group; "
                f"{hint}"
            )
    return world_size, rank, local_rank


def pick_device(requested: Optional[str], local_rank: int) -> torch.device:
    """--device if given, else the local GPU when there is one, else the CPU."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as err:
            raise TrainError(f"--device: expected cpu, cuda or cuda:N, got {requested!r}") from err
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    if device.type == "meta":
        raise TrainError(
            f"--device {requested}: meta tensors hold no data (shape propagation "
            f"only) and a run computes on data; expected cpu or cuda"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(
                f"--device {requested}: CUDA is not available in this torch build or "
                f"on this machine"
            )
        torch.cuda.set_device(device)
    return device


def init(requested_device: Optional[str] = None) -> Context:
    """Joins the torchrun process group when WORLD_SIZE > 1 (nccl on GPUs, gloo on the CPU)."""
    world_size, rank, local_rank = read_environment()
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    return Context(rank, world_size, local_rank, device)


def shutdown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx: Context, tensor: torch.Tensor) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(ctx: Context, obj: Any) -> List[Any]:
    if not ctx.enabled:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: Context, obj: Any) -> Any:
    """rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()
