"""All-reduce helpers for loss state that must agree across ranks (no-ops without a process group)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group exists (collectives are then required on every rank)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce of ``tensor`` over the default group (``op`` = "sum" or "max"); returns it."""
    if is_distributed():
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(tensor, op=reduce_op)
    return tensor

