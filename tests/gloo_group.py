"""A gloo group for tests that spawn ranks themselves (the trainer's own entry points use
:func:`ssl_vil.infra.dist.process_group`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from ssl_vil.infra.dist import leave_group


@contextmanager
def gloo_group(rank: int, world: int, rendezvous: str | Path) -> Iterator[None]:
    """Join a gloo group through the file ``rendezvous`` (a path no other group uses, so there is no TCP port
    to race for) and leave it together with :func:`~ssl_vil.infra.dist.leave_group`. On an exception the group
    is destroyed without the barrier (the other rank may never reach it); the test fails on the exception."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_group()
