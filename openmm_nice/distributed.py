"""torch.distributed set-up for training under torchrun: one process group, rank-aware I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Ranks", "init_distributed", "shutdown_distributed"]


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


def init_distributed(device: str, timeout_s: float = 300.0) -> Ranks:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), if any.

    gloo on CPU and NCCL on CUDA; under torchrun with CUDA each rank takes the GPU of its
    local rank. Outside torchrun this does nothing and returns a single-process :class:`Ranks`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    return Ranks(rank, world_size, local_rank)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
