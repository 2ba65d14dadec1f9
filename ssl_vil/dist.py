"""Process-group set-up from the launcher's environment (torchrun, Slurm via submitit, or none).

The same entry point runs single-process, under ``torchrun`` and under the Slurm launcher: all of them export
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (or nothing, for one process).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` -> the local-rank GPU when CUDA is present, else CPU; never rewrites CUDA_VISIBLE_DEVICES."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available on this machine")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(*, device: str = "auto", backend: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                      timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` | ``max`` | ``min`` | ``mean``); a no-op in a single process."""
    if is_distributed():
        red = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN,
               "mean": torch_dist.ReduceOp.SUM}[op]
        torch_dist.all_reduce(t, op=red)
        if op == "mean":
            t.div_(torch_dist.get_world_size())
    return t


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def shutdown() -> None:
    if is_distributed():
        torch_dist.destroy_process_group()
