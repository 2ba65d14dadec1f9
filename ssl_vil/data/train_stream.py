"""The training stream: per-rank batches from WebDataset shards, exactly-once per epoch, resumable anywhere.

Design: **slots** (see :mod:`ssl_vil.data.layout`). A global batch of ``G = batch_size * world_size`` has ``G``
slots; the sample order of an epoch is a pure function of ``(seed, epoch, shard list + counts, G)`` and rank
``r`` takes slots ``[r*B, (r+1)*B)`` of every global batch. Hence

- every sample is read once per epoch and every rank runs ``batches_per_epoch`` steps (the last global batch may
  hold padding, flagged in ``batch["padded"]``);
- the batches do not depend on ``num_workers`` nor on the topology at a fixed ``G``: the cursor is just
  ``(epoch, batches consumed)``, and a run resumed with other worker counts or another ``world_size x batch_size``
  with the same ``G`` continues with exactly the batches (keys and augmented views) an uninterrupted run yields;
- I/O stays local: a slot reads one contiguous region of the epoch's permuted shard sequence (resampled mode: whole
  shards drawn with replacement), so each shard is read once per epoch in total and local shards are seeked, not
  streamed, to a region's first record.

Sources (:func:`resolve_train_data`): local shards are seeked; remote ones (``http(s)://...``, read with
webdataset's ``gopen``) are streamed, a slot that starts inside a shard reading through the records before its
region, with the same records, keys and order as the local copy; an image folder is read as virtual shards of its
sorted files (:mod:`ssl_vil.data.folder_records`). All of them share the layout, seeding and cursor above.

Inside a rank, DataLoader worker ``w`` of ``W`` runs the rank's contiguous block of slots
``[w*B//W, (w+1)*B//W)`` (each slot a webdataset ``DataPipeline``: raw tar records -> seeded window shuffle ->
decode -> transform) and yields one partial batch per step, its views stacked per view index into one shared-memory
buffer (one file descriptor per step and worker); the rank's main process joins the ``W`` parts of a step and
applies the collate with a generator seeded from ``(seed, epoch, batch index, r*B)``. A collate with a
``collate_stacked`` method gets the stacked parts (:class:`ssl_vil.data.collate.StackedSamples`) and concatenates
them, one copy (none with one worker, for the default collate) and no per-sample work in the main process; any
other collate gets the samples one by one.

Batches: the collate's dict plus ``padded`` (BoolTensor (B,)), ``data_errors`` (issue-counter deltas since the
previous batch, every key of :data:`ssl_vil.data.error_tally.COUNTER_KEYS`), ``data_error_details`` (shard URL,
record, key and message of the first issue of each category on this rank), ``epoch`` and ``batch_in_epoch``.

Iterating the stream yields the rest of the current epoch (from the cursor) and then moves the cursor to the next
epoch; in resampled mode an "epoch" is ``ceil(samples_per_epoch / G)`` steps of the endless stream.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from ssl_vil.data.collate import StackedSamples, default_collate_views
from ssl_vil.data.cursor import EpochCursor, ResumableStream
from ssl_vil.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from ssl_vil.data.error_tally import ErrorTally
from ssl_vil.data.errors import DataConfigError, DataErrorBudgetExceeded, DataIssue
from ssl_vil.data.folder_records import folder_shard_set, is_image_folder
from ssl_vil.data.layout import EpochLayout
from ssl_vil.data.seeding import make_generator, stable_seed
from ssl_vil.data.shardlist import ShardSet, ShardSpec, resolve_shard_set
from ssl_vil.data.slot_stream import SlotOutput, SlotStream, StreamSpec, Transform
from ssl_vil.data.workers import check_topology, worker_loader, worker_position

logger = logging.getLogger("ssl_vil.data")

CURSOR_FORMAT = "ssl_vil.data.cursor/1"

Collate = Callable[[list[dict[str, Any]], torch.Generator], dict[str, Any]]


def _stack(tensors: list[Tensor]) -> Tensor:
    """Stack along a new first dim; inside a DataLoader worker, straight into shared memory (no copy on send)."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first.untyped_storage()._new_shared(len(tensors) * first.numel() * first.element_size())
    out = first.new_empty(0).set_(storage).view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


_ALIGN = 64  # bytes: each view block of a packed part starts on a cache line


def _stack_flat(groups: list[list[Tensor]]) -> tuple[Tensor, list[tuple[torch.dtype, tuple[int, ...], int]]]:
    """Stack each group (one view index of a worker's samples) into one byte buffer, in shared memory inside a
    DataLoader worker: one file descriptor per step and worker crosses to the main process instead of one per
    view. Returns the buffer and, per group, (dtype, stacked shape, byte offset) for :func:`_unflatten`."""
    layout, offset = [], 0
    for group in groups:
        first = group[0]
        layout.append((first.dtype, (len(group), *first.shape), offset))
        offset += -(-len(group) * first.numel() * first.element_size() // _ALIGN) * _ALIGN
    if get_worker_info() is None:
        flat = torch.empty(offset, dtype=torch.uint8)
    else:
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(offset, _ALIGN)))[:offset]
    for group, stacked in zip(groups, _unflatten(flat, layout)):
        torch.stack(group, out=stacked)
    return flat, layout


def _unflatten(flat: Tensor, layout: list[tuple[torch.dtype, tuple[int, ...], int]]) -> list[Tensor]:
    """The stacked views of a :func:`_stack_flat` buffer (views of its memory, no copy)."""
    out = []
    for dtype, shape, offset in layout:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append(flat[offset : offset + nbytes].view(dtype).view(shape))
    return out


def _pack_views(views: list[Any]) -> tuple[str, Any]:
    """Stack one worker's views per view index, so a step crosses the process boundary as one shared buffer."""
    if get_worker_info() is None:
        return "raw", views  # same process: nothing to send, nothing to pack
    first = views[0]
    if isinstance(first, Tensor) and all(isinstance(v, Tensor) and v.shape == first.shape and v.dtype == first.dtype
                                         for v in views):
        return "tensor", _stack(views)
    if isinstance(first, (list, tuple)) and first and all(isinstance(t, Tensor) for t in first):
        signature = [(t.shape, t.dtype) for t in first]
        if all(isinstance(v, (list, tuple)) and [(t.shape, t.dtype) for t in v] == signature for v in views):
            return "flat", _stack_flat([[v[i] for v in views] for i in range(len(signature))])
    return "raw", views


def _receive_views(packed: tuple[str, Any]) -> tuple[str, Any]:
    """In the main process: a packed buffer back to its stacked views (kind "list")."""
    kind, data = packed
    return ("list", _unflatten(*data)) if kind == "flat" else packed


def _unpack_views(packed: tuple[str, Any], n: int) -> list[Any]:
    kind, data = _receive_views(packed)
    if kind == "tensor":
        return [data[i] for i in range(n)]
    if kind == "list":
        return [[t[i] for t in data] for i in range(n)]
    return list(data)


@dataclass(eq=False)
class _RankSteps(IterableDataset):
    """One rank's partial batches for steps ``start .. stop-1``; one item per step from every worker."""

    spec: StreamSpec
    _: KW_ONLY
    rank: int
    batch_size: int
    epoch: int
    start: int
    stop: int
    layout: EpochLayout | None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = worker_position()
        return iter(wds.DataPipeline(lambda: self._steps(worker, workers), self._pack))

    def _steps(self, worker: int, workers: int) -> Iterator[tuple[int, int, list[int], list[SlotOutput]]]:
        # Contiguous blocks: the parts concatenate in slot order (which worker computes a slot changes nothing).
        local = list(range(worker * self.batch_size // workers, (worker + 1) * self.batch_size // workers))
        streams = [
            iter(
                SlotStream(
                    self.spec, self.rank * self.batch_size + j, start=self.start, stop=self.stop,
                    epoch=self.epoch, layout=self.layout,
                )
            )
            for j in local
        ]
        for step in range(self.start, self.stop):
            yield step, worker, local, [next(s) for s in streams]

    @staticmethod
    def _pack(items: Iterator[tuple[int, int, list[int], list[SlotOutput]]]) -> Iterator[dict[str, Any]]:
        for step, worker, local, outs in items:
            events: list[DataIssue] = [e for o in outs for e in o.events]
            yield {
                "step": step,
                "worker": worker,
                "slots": local,
                "keys": [o.key for o in outs],
                "labels": [o.label for o in outs],
                "views": _pack_views([o.views for o in outs]) if outs else ("raw", []),
                "padded": [o.padded for o in outs],
                "lost_urls": [o.lost_url for o in outs if o.lost],
                "events": events,
            }


class TrainStream(ResumableStream):
    """Iterable over one rank's training batches with a resumable cursor (see the module docstring).

    Properties: ``epoch`` (epoch of the next batch), ``batches_consumed`` (batches of that epoch already yielded),
    ``batches_per_epoch`` (steps per epoch, equal on every rank), ``samples_per_epoch``, ``global_batch_size``,
    ``classes``, ``error_totals``. ``state_dict()`` / ``load_state_dict()`` save and restore the cursor
    (:class:`ssl_vil.data.cursor.ResumableStream`); the state is the same on every rank and holds no topology.
    """

    cursor_format = CURSOR_FORMAT

    def __init__(
        self,
        shards: ShardSet,
        *,
        mode: Literal["epoch", "resampled"] = "epoch",
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        transform: Transform,
        collate: Collate = default_collate_views,
        samples_per_epoch: int | None = None,
        error_budget_fraction: float | None = 0.01,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        shuffle_window_samples: int = 64,
        drop_last: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: str | None = None,
        worker_timeout_s: float = 0.0,
        budget_error: Literal["raise", "attach"] = "raise",
    ) -> None:
        if mode not in ("epoch", "resampled"):
            raise DataConfigError(f"data mode must be 'epoch' or 'resampled', got {mode!r}")
        check_topology(batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers)
        if shuffle_window_samples < 1:
            raise DataConfigError(f"shuffle_window_samples must be >= 1, got {shuffle_window_samples}")
        readers = world_size * max(1, num_workers)
        # A folder's chunks are files read one by one, so any number of readers can share one; tar shards are not.
        if shards.folder is None and len(shards.urls) < readers:
            raise DataConfigError(
                f"fewer shards than workers: {len(shards.urls)} shard(s) for {world_size} rank(s) x "
                f"{max(1, num_workers)} worker(s) = {readers} reader slots; write more, smaller shards "
                "(make_shards --maxcount) or lower data.num_workers"
            )
        if batch_size * shuffle_window_samples > 50_000:
            logger.warning(
                "shuffle_window_samples=%d is per slot: this rank buffers up to %d encoded samples (x its %d slots); "
                "a window of 16-256 is usually enough, the slots of a global batch already mix %d regions",
                shuffle_window_samples, batch_size * shuffle_window_samples, batch_size, batch_size * world_size,
            )
        if num_workers > batch_size:
            logger.warning("num_workers=%d > batch_size=%d: %d workers stay idle", num_workers, batch_size,
                           num_workers - batch_size)
        self.shards = shards
        self.mode = mode
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.collate = collate
        self.drop_last = drop_last
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.worker_timeout_s = worker_timeout_s
        self.shuffle_window_samples = shuffle_window_samples
        self._samples_per_epoch_arg = samples_per_epoch
        self._spec = StreamSpec(
            urls=shards.urls, counts=shards.counts, seed=seed, mode=mode, window=shuffle_window_samples,
            global_batch=self.global_batch_size, transform=transform, max_pixels=max_image_pixels,
            folder=shards.folder,
        )
        if mode == "epoch":
            probe = self._layout(0)  # validates sizes; slot lengths are the same every epoch
            self._batches_per_epoch = probe.steps
            self._samples_per_epoch = probe.num_real
            planned = sum(probe.slot_lengths[rank * batch_size : (rank + 1) * batch_size])
        else:
            total = shards.num_samples if samples_per_epoch is None else samples_per_epoch
            if total < 1:
                raise DataConfigError(f"samples_per_epoch must be >= 1, got {total}")
            if not any(shards.counts):
                raise DataConfigError("every shard is empty; nothing to resample from")
            self._batches_per_epoch = math.ceil(total / self.global_batch_size)
            self._samples_per_epoch = total
            planned = self._batches_per_epoch * batch_size
        self._tally = ErrorTally(budget_fraction=error_budget_fraction, planned_per_epoch=planned, rank=rank)
        # "attach": the batch that blew the budget is still delivered, with the error under "data_budget_error",
        # so a trainer can stop every rank at the same step instead of one rank raising alone.
        self._budget_error = budget_error
        self._cursor = EpochCursor(self._batches_per_epoch)

    # -- cursor ----------------------------------------------------------------------------------------------

    @property
    def samples_per_epoch(self) -> int:
        return self._samples_per_epoch

    @property
    def classes(self) -> tuple[str, ...]:
        return self.shards.classes

    @property
    def error_totals(self) -> dict[str, int]:
        return dict(self._tally.totals)

    def _fingerprint(self) -> dict[str, Any]:
        """Cursor fields that must match for a resume to continue the same sample order."""
        return {
            "mode": self.mode,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "shards": self.shards.digest(),
            "shuffle_window_samples": self.shuffle_window_samples,
            "drop_last": self.drop_last,
            "samples_per_epoch": self._samples_per_epoch_arg,
        }

    # -- iteration -------------------------------------------------------------------------------------------

    def _layout(self, epoch: int) -> EpochLayout:
        return EpochLayout(
            self.shards.counts, seed=self.seed, epoch=epoch, global_batch=self.global_batch_size,
            drop_last=self.drop_last, samples_per_epoch=self._samples_per_epoch_arg,
        )

    def _epoch_batches(self, epoch: int, first: int) -> Generator[dict[str, Any], None, None]:
        if first == 0:
            self._tally.new_epoch()
        # Resampled steps are positions in one endless stream; epoch steps restart at 0 every epoch.
        offset = epoch * self._batches_per_epoch if self.mode == "resampled" else 0
        steps = _RankSteps(
            self._spec, rank=self.rank, batch_size=self.batch_size, epoch=epoch,
            start=offset + first, stop=offset + self._batches_per_epoch,
            layout=self._layout(epoch) if self.mode == "epoch" else None,
        )
        workers = max(1, self.num_workers)
        loader = worker_loader(
            steps, self.num_workers, prefetch_factor=self.prefetch_factor, persistent_workers=False,
            multiprocessing_context=self.multiprocessing_context, timeout=self.worker_timeout_s,
        )
        parts_iter = iter(loader)
        try:
            for index in range(first, self._batches_per_epoch):
                parts = [next(parts_iter) for _ in range(workers)]
                for worker, part in enumerate(parts):
                    if part["step"] != offset + index or part["worker"] != worker:
                        raise RuntimeError(
                            f"data worker order broken: expected step {offset + index} from worker {worker}, got "
                            f"step {part['step']} from worker {part['worker']}"
                        )
                yield self._assemble(parts, epoch, index)
        finally:
            del parts_iter

    def _deliver(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The budget check, once the cursor has counted the batch: raise, or attach the error to the batch."""
        try:
            self._tally.check_budget()
        except DataErrorBudgetExceeded as e:
            if self._budget_error == "raise":
                raise
            batch["data_budget_error"] = e
        return batch

    def _assemble(self, parts: list[dict[str, Any]], epoch: int, index: int) -> dict[str, Any]:
        parts = [p for p in parts if p["slots"]]  # a worker without slots (B < W) sends an empty part
        for p in parts:
            p["views"] = _receive_views(p["views"])
        if [j for p in parts for j in p["slots"]] != list(range(self.batch_size)):
            raise RuntimeError(f"data worker parts cover slots {[p['slots'] for p in parts]}, expected "
                               f"0..{self.batch_size - 1} in order")
        padded = [pad for p in parts for pad in p["padded"]]
        events = [e for p in parts for e in p["events"]]
        lost = [url for p in parts for url in p["lost_urls"]]
        generator = make_generator(stable_seed(self.seed, "collate", epoch, index, self.rank * self.batch_size))
        stacked = StackedSamples(keys=[k for p in parts for k in p["keys"]],
                                 labels=[lab for p in parts for lab in p["labels"]],
                                 parts=[p["views"][1] for p in parts if p["views"][0] == "list"])
        if hasattr(self.collate, "collate_stacked") and len(stacked.parts) == len(parts) and stacked.uniform():
            batch = self.collate.collate_stacked(stacked, generator)
        else:
            views = [v for p in parts for v in _unpack_views(p["views"], len(p["slots"]))]
            batch = self.collate([{"key": k, "label": lab, "views": v}
                                  for k, lab, v in zip(stacked.keys, stacked.labels, views)], generator)
        if not isinstance(batch, dict):
            raise TypeError(f"collate must return a dict, got {type(batch).__name__}")
        deltas, details = self._tally.add(events, lost)
        batch["padded"] = torch.tensor(padded, dtype=torch.bool)
        batch["data_errors"] = deltas
        batch["data_error_details"] = details
        batch["epoch"] = epoch
        batch["batch_in_epoch"] = index
        return batch


def build_train_stream(
    urls_or_dir: ShardSpec,
    *,
    split: str | None = None,
    allow_pipe: bool = False,
    shard_sizes: Mapping[str, int] | None = None,
    **options: Any,
) -> TrainStream:
    """The training stream of rank ``rank`` over the shards of ``urls_or_dir`` (see :class:`TrainStream`).

    ``split`` / ``allow_pipe`` / ``shard_sizes`` resolve the shards (:func:`resolve_train_data`);
    ``options`` are :class:`TrainStream`'s keyword arguments: ``batch_size`` is per rank; ``transform(image,
    generator)`` maps an RGB PIL image to the sample's views; ``samples_per_epoch`` (None: all records) sizes an
    epoch; ``error_budget_fraction`` (None: off) bounds the fraction of an epoch's planned samples that bad data may
    cost; ``shuffle_window_samples`` is the raw-record shuffle window per slot (memory per rank ~ ``batch_size x
    window x`` mean encoded sample size).
    """
    shards = resolve_train_data(urls_or_dir, split=split, allow_pipe=allow_pipe, shard_sizes=shard_sizes)
    return TrainStream(shards, **options)


def resolve_train_data(
    urls_or_dir: ShardSpec,
    *,
    split: str | None = None,
    allow_pipe: bool = False,
    shard_sizes: Mapping[str, int] | None = None,
) -> ShardSet:
    """The shards of ``urls_or_dir`` (:func:`ssl_vil.data.shardlist.resolve_shard_set`; of several splits,
    ``train`` unless ``split`` names one), or the virtual shards of a local image folder
    (:mod:`ssl_vil.data.folder_records`)."""
    if isinstance(urls_or_dir, (str, os.PathLike)) and is_image_folder(urls_or_dir):
        if split is not None:
            raise DataConfigError(
                f"got {split!r}, but {os.fspath(urls_or_dir)} is an image folder, which has no splits; expected "
                "no split (point the data at the split's folder instead)", key="split")
        shards = folder_shard_set(urls_or_dir)
        logger.info("image folder %s: %d files, %d classes, read as %d chunks", os.fspath(urls_or_dir),
                    shards.num_samples, len(shards.classes), len(shards.urls))
        return shards
    return resolve_shard_set(urls_or_dir, split=split, allow_pipe=allow_pipe, shard_sizes=shard_sizes,
                             prefer_split="train")
