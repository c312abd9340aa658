"""One process or many: the process group a run belongs to, read from ``torchrun``'s environment.

Without WORLD_SIZE (or with 1) a run is one process and nothing here communicates. Under ``torchrun`` the
processes join one group (NCCL on CUDA, gloo on the CPU), each takes its slice of the global batch, and the
gradients are averaged by an explicit all-reduce (a sum, then a division by the number of processes) after
each backward pass, in buckets of parameters in their fixed order. All processes thus apply the same update
to the same weights; only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import UserError

#: elements per all-reduce bucket (float32: 100 MB)
BUCKET = 25_000_000


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def join_world(device_type: str) -> World:
    """This process's place from RANK / WORLD_SIZE / LOCAL_RANK (torchrun); joins the process group when
    there are several (gloo on the CPU, NCCL on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    if world.distributed and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise UserError("WORLD_SIZE is set but MASTER_ADDR is not: start several processes with torchrun")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=world.rank, world_size=size)
    return world


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(parameters: Iterable[torch.nn.Parameter], world: World) -> None:
    """Replace every gradient by its mean over the processes. A missing gradient becomes zeros, also in one
    process, so that the optimiser treats every parameter alike whatever the number of processes."""
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not world.distributed:
        return
    bucket: list[Tensor] = []
    for p in params:
        bucket.append(p.grad)
        if sum(g.numel() for g in bucket) >= BUCKET:
            _reduce(bucket, world)
            bucket = []
    if bucket:
        _reduce(bucket, world)


def _reduce(grads: list[Tensor], world: World) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_world(values: Tensor, world: World) -> Tensor:
    """The mean of ``values`` over the processes (a copy; the input when there is one process)."""
    if not world.distributed:
        return values
    total = values.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world.size


def all_agree(ok: bool, world: World, device: torch.device) -> bool:
    """Whether every process says ``ok`` (e.g. that rank 0 wrote its checkpoint)."""
    if not world.distributed:
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_to_main(item: Any, world: World) -> list[Any]:
    """Every process's ``item`` (picklable; tensors on the CPU), in rank order, on rank 0; elsewhere []."""
    if not world.distributed:
        return [item]
    gathered: list[Any] | None = [None] * world.size if world.main else None
    dist.gather_object(item, gathered, dst=0)
    return gathered or []
