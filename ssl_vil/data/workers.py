"""Where a stream's batches are made: the topology checks, DataLoader worker identity, and the worker set-up
shared by the training and the evaluation streams."""

from __future__ import annotations

import signal
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssl_vil.data.errors import DataConfigError


def check_topology(*, batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    """Raise :class:`DataConfigError` unless batch_size >= 1, world_size >= 1, 0 <= rank < world_size and
    num_workers >= 0."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise DataConfigError(
            f"need batch_size >= 1, world_size >= 1, 0 <= rank < world_size, num_workers >= 0; got "
            f"batch_size={batch_size}, rank={rank}, world_size={world_size}, num_workers={num_workers}"
        )


def worker_position() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the calling DataLoader worker; ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGUSR2 / SIGTERM to the trainer so a preemption can checkpoint."""
    del worker_id
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_loader(dataset: IterableDataset, num_workers: int, **loader_kwargs: Any) -> Any:
    """``dataset`` itself when ``num_workers`` is 0, else an unbatched DataLoader over it whose workers ignore
    the preemption signals (``loader_kwargs``: further DataLoader options)."""
    if num_workers == 0:
        return dataset
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, worker_init_fn=ignore_preemption_signals,
                      **loader_kwargs)
