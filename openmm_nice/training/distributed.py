"""torch.distributed set-up for training under torchrun: one process group, rank-aware I/O."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Ranks", "process_group"]


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank, world size and local rank (all 0/1/0 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, summaries and plots."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@contextmanager
def process_group(device: str, timeout_s: float = 300.0) -> Iterator[Ranks]:
    """Where this process stands in a torch process group, for the length of a block.

    A group that already exists (the caller's) is used and left as it is. Otherwise, under
    torchrun (WORLD_SIZE, RANK, LOCAL_RANK), a group is created (gloo on CPU, NCCL on CUDA, where
    each rank takes the GPU of its local rank) and destroyed on leaving the block. Outside
    torchrun this does nothing and yields a single-process :class:`Ranks`.

    Example:
        >>> with process_group("cpu") as ranks:  # no torchrun here
        ...     ranks.world_size
        1
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size(), local_rank)
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield Ranks()
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s)
    )
    try:
        yield Ranks(int(os.environ["RANK"]), world_size, local_rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
