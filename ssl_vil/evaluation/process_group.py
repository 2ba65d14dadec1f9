"""Process-group lifetime of an evaluation entry point (single process, torchrun or Slurm)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as torch_dist

from ssl_vil.dist import DistInfo, barrier, env_world_size, init_distributed, is_distributed


@contextmanager
def eval_process_group(device: str) -> Iterator[DistInfo]:
    """:func:`ssl_vil.dist.init_distributed`, and on a normal exit a barrier plus ``destroy_process_group`` for a
    group this call created.

    Without the explicit teardown, a rank that exits first closes its gloo connections while the other is
    still shutting down, and that rank aborts (SIGABRT) after the work is done. A group that existed before
    (an embedding caller) is left alone.
    """
    created = env_world_size() > 1 and not is_distributed()
    info = init_distributed(device=device)
    yield info
    if created and is_distributed():
        barrier()
        torch_dist.destroy_process_group()
