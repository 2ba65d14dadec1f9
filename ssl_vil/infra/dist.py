"""Process-group set-up from the launcher's environment, and the collectives the project uses.

The same entry points run single-process, under ``torchrun`` and under the Slurm launcher: all of them export
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (or nothing, for one process).
Every collective here is a no-op (returns its input) when no process group exists, so callers never test for
one themselves.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as torch_dist

ReduceOp = Literal["sum", "max", "min", "mean"]
REDUCE_OPS: tuple[str, ...] = ("sum", "max", "min", "mean")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): the job size before any process group exists."""
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


@contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """:func:`init_distributed` for the lifetime of an entry point; on a normal exit, a barrier and
    ``destroy_process_group`` for a group this call created.

    Without the explicit teardown, a rank that exits first closes its gloo connections while the other is
    still shutting down, and that rank aborts (SIGABRT) after the work is done. A group that existed before
    (an embedding caller) is left alone.
    """
    created = env_world_size() > 1 and not is_distributed()
    info = init_distributed(device=device)
    yield info
    if created and is_distributed():
        leave_group()


def leave_group() -> None:
    """Tear the default process group down on every rank together (call it on all ranks, after the work).

    First the garbage that still references the group (FSDP2's device mesh and DTensors sit in reference
    cycles) is freed while the group exists; then a barrier, so no rank closes its connections while another
    is still using them; then ``destroy_process_group``. Skipping either step lets a rank abort with SIGABRT
    ("terminate called without an active exception") after its work is done.
    """
    gc.collect()
    barrier()
    torch_dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a default process group exists (collectives are then required on every rank)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def is_dtensor(t: Any) -> bool:
    """True for a DTensor (an FSDP2-sharded parameter, its gradient or a reduction of them); False when this
    torch has no distributed package."""
    if not torch_dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (the default group when None); 1 without a process group."""
    return torch_dist.get_world_size(group) if is_distributed() else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group``; 0 without a process group."""
    return torch_dist.get_rank(group) if is_distributed() else 0


def collective_device(group: Any = None) -> torch.device:
    """Where a tensor must live to take part in a collective of ``group``: the current GPU under NCCL, else CPU."""
    if is_distributed() and torch_dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: torch.Tensor, op: ReduceOp = "sum", group: Any = None) -> torch.Tensor:
    """In-place all-reduce of ``t`` (``sum`` | ``max`` | ``min`` | ``mean``); returns ``t``.

    A no-op in a single process. ``mean`` is a sum divided by the group size (``t`` must be floating point).
    """
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; expected one of {REDUCE_OPS}")
    if is_distributed():
        red = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN,
               "mean": torch_dist.ReduceOp.SUM}[op]
        torch_dist.all_reduce(t, op=red, group=group)
        if op == "mean":
            t.div_(torch_dist.get_world_size(group))
    return t


def all_reduce_scalar(value: float, op: ReduceOp = "sum", device: torch.device | None = None) -> Any:
    """All-reduce one Python number over the default group; returns a number of the same kind (int or float).

    ``device``: where the one-element tensor lives (default: :func:`collective_device`).
    """
    t = torch.tensor([value], device=device if device is not None else collective_device())
    return all_reduce_(t, op).item()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled objects); ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of ``t`` from rank ``src``; returns ``t`` (a no-op without a process group)."""
    if is_distributed():
        torch_dist.broadcast(t, src=src)
    return t


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed():
        torch_dist.barrier()


def shutdown() -> None:
    """Destroy the default process group if there is one."""
    if is_distributed():
        torch_dist.destroy_process_group()
