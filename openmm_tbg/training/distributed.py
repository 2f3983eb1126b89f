"""Data-parallel training under ``torchrun`` (``WORLD_SIZE > 1``): process group, DDP wrapper, collectives.

Each rank draws its own batches; gradients are averaged by :class:`torch.nn.parallel.DistributedDataParallel`
and only rank 0 writes files. A single process (no ``WORLD_SIZE``) needs none of this and every helper here
is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..utils import resolve_device


@dataclass
class DistInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def active(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one that logs and writes files."""
        return self.rank == 0


def setup_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Initialise torch.distributed from torchrun's environment (WORLD_SIZE > 1); otherwise single process.

    Parameters
    ----------
    device_pref : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; under DDP on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_pref)
    if world <= 1:
        return DistInfo(), device
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    created_group=created)
    return info, device


def wrap_model(vector_field: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """The module to call in the loop: ``vector_field`` itself, or its DDP wrapper when several ranks train."""
    if not info.active:
        return vector_field
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: a vector field may own parameters that do not reach its output (the EGNN's
    # last node update); without it DDP stops with "Expected to have finished reduction".
    return DistributedDataParallel(vector_field, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar tensor over all ranks, as a Python float."""
    value = value.detach()
    if info.active:
        import torch.distributed as dist

        dist.all_reduce(value)
        value = value / info.world_size
    return float(value.cpu())


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not info.active:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def teardown(info: DistInfo) -> None:
    """Wait for all ranks and destroy the process group, if this run created it."""
    if info.created_group:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
