"""Where a stream's batches are made: the topology checks, DataLoader worker identity, and the worker set-up
shared by the training and the evaluation streams."""

from __future__ import annotations

import atexit
import signal
import weakref
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


# Left to the rank's main process: a preemption (SIGUSR2 / SIGTERM) or a Ctrl-C (SIGINT, sent to the whole
# foreground process group) makes it save at the next step boundary, and a worker that died of it mid-batch
# would take the rank down first. The main process shuts its workers down itself.
WORKER_IGNORED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore :data:`WORKER_IGNORED_SIGNALS`, leaving them to the trainer."""
    del worker_id
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# Iterators of worker_loader's loaders that have worker processes, until they are garbage.
_live_iterators: weakref.WeakSet[Any] = weakref.WeakSet()


class _WorkerLoader(DataLoader):
    """A DataLoader whose multi-process iterators are registered for :func:`_kill_workers_at_exit`."""

    def _get_iterator(self) -> Any:
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            _live_iterators.add(iterator)
        return iterator


@atexit.register  # registered after torch's and multiprocessing's exit handlers, so it runs before them
def _kill_workers_at_exit() -> None:
    """At interpreter exit, stop the workers of iterators still alive (e.g. held by an exception's traceback).

    They ignore SIGTERM, and multiprocessing's exit handler terminates daemon children with SIGTERM and then joins
    them without a timeout: the process would wait forever for workers that wait for their next index. The
    iterator's own shutdown (what its ``__del__`` would do) stops the idle ones; a worker still busy after it is
    killed, since workers hold no state worth waiting for.
    """
    for iterator in list(_live_iterators):
        iterator._shutdown_workers()
        for process in getattr(iterator, "_workers", ()):
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)


def worker_loader(dataset: IterableDataset, num_workers: int, **loader_kwargs: Any) -> Any:
    """``dataset`` itself when ``num_workers`` is 0, else an unbatched DataLoader over it whose workers ignore
    the preemption signals and SIGINT (``loader_kwargs``: further DataLoader options)."""
    if num_workers == 0:
        return dataset
    return _WorkerLoader(dataset, batch_size=None, num_workers=num_workers, worker_init_fn=ignore_preemption_signals,
                         **loader_kwargs)
