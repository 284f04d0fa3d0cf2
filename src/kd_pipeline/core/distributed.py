"""torch.distributed helpers shared by the multi-process stages (torchrun: one process per GPU)."""

from __future__ import annotations

import os
from typing import Any

import torch


def distributed_from_env(device_type: str = "cpu") -> tuple[int, int]:
    """(rank, world_size) of this process; under torchrun (WORLD_SIZE > 1) the default process
    group is initialized here if needed (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        from datetime import timedelta

        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Ranks finish their shares at different times; the barrier must outwait the slowest.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


def barrier(world_size: int) -> None:
    """Wait for every rank (no-op for one process)."""
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("world_size > 1 needs an initialized torch.distributed process group "
                               "(run under torchrun; see distributed_from_env)")
        dist.barrier()


def gather(obj: Any, world_size: int) -> list:
    """`obj` of every rank, in rank order (`[obj]` for one process)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered
