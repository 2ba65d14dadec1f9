"""The evaluation stream: every sample exactly once across ranks, in a fixed order, no padding.

The shards' records, concatenated in manifest order, are split into ``world_size`` contiguous ranges whose
sizes differ by at most one; rank ``r`` reads its range in order, in batches of ``batch_size`` (the last one may
be smaller, and a batch shrinks by the bad records it contained), so ranks may run one batch more or fewer than
each other: gather results with their sizes. Batch ``i`` of a rank is made by DataLoader
worker ``i % num_workers``, so the order does not depend on ``num_workers``. Each batch is
``{"keys": list[str], "labels": LongTensor (n,), "images": Tensor (n, ...), "data_errors": {...}}``;
bad records are dropped and counted like in the training stream (no budget: evaluation reports, it does not stop).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset

from ssl_vil.data.decode import DEFAULT_MAX_IMAGE_PIXELS, SampleIssue, decode_record
from ssl_vil.data.error_tally import ErrorTally, zero_counts
from ssl_vil.data.errors import DataError, DataIssue
from ssl_vil.data.layout import concatenated_pieces, cumulative_ends
from ssl_vil.data.shardlist import ShardSet, ShardSpec, resolve_shard_set
from ssl_vil.data.tar_records import PieceReader
from ssl_vil.data.workers import check_topology, worker_loader, worker_position

logger = logging.getLogger("ssl_vil.data")

EvalTransform = Callable[[Image.Image], Tensor]


@dataclass(eq=False)
class _EvalBatches(IterableDataset):
    """Batches of the records ``first .. stop-1`` of the concatenated shards; ``rounds`` items per worker."""

    shards: ShardSet
    _: KW_ONLY
    first: int
    stop: int
    batch_size: int
    rounds: int
    transform: EvalTransform
    max_pixels: int

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = worker_position()
        return iter(wds.DataPipeline(lambda: self._batches(worker, workers)))

    def _batches(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        order = list(range(len(self.shards.urls)))
        ends = cumulative_ends(self.shards.counts, order)
        with closing(PieceReader(self.shards.urls, self.shards.counts)) as reader:
            # Every worker yields `rounds` items (placeholders past the end) so the loader's order stays round-robin.
            for i in range(worker, self.rounds * workers, workers):
                a = self.first + i * self.batch_size
                b = min(a + self.batch_size, self.stop)
                if a >= b:
                    yield {"index": i, "keys": [], "labels": [], "images": [], "events": []}
                    continue
                keys: list[str] = []
                labels: list[int] = []
                images: list[Tensor] = []
                events: list[DataIssue] = []
                for piece in concatenated_pieces(self.shards.counts, order, ends, a, b):
                    url = self.shards.urls[piece.shard]
                    for rec in reader.read(piece.shard, piece.start, piece.stop):
                        events.extend(rec.events)
                        if rec.members is None or rec.key is None:
                            continue
                        try:
                            image, label = decode_record(
                                rec.members, url=url, record=rec.index, key=rec.key, max_pixels=self.max_pixels
                            )
                        except SampleIssue as exc:
                            events.append(exc.issue)
                            continue
                        try:
                            tensor = self.transform(image)
                        except Exception as exc:
                            raise DataError(
                                f"eval transform failed on sample {rec.key!r} (record {rec.index} of {url}): {exc}"
                            ) from exc
                        keys.append(rec.key)
                        labels.append(label)
                        images.append(tensor)
                yield {"index": i, "keys": keys, "labels": labels, "images": images, "events": events}


class EvalStream:
    """One rank's evaluation batches; ``len()`` = planned batches, ``num_samples`` = planned samples."""

    def __init__(self, shards: ShardSet, *, batch_size: int, rank: int, world_size: int,
                 transform: EvalTransform, num_workers: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 multiprocessing_context: str | None = None) -> None:
        check_topology(batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers)
        total = shards.num_samples
        self.shards = shards
        self.first = rank * total // world_size
        self.stop = (rank + 1) * total // world_size
        self.batch_size = batch_size
        self.rank = rank
        self.num_workers = num_workers
        self.transform = transform
        self.max_image_pixels = max_image_pixels
        self.multiprocessing_context = multiprocessing_context
        self._tally = ErrorTally(budget_fraction=None, planned_per_epoch=self.num_samples, rank=rank)

    @property
    def num_samples(self) -> int:
        return self.stop - self.first

    @property
    def classes(self) -> tuple[str, ...]:
        return self.shards.classes

    @property
    def error_totals(self) -> dict[str, int]:
        return dict(self._tally.totals)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = max(1, self.num_workers)
        rounds = math.ceil(len(self) / workers)
        dataset = _EvalBatches(self.shards, first=self.first, stop=self.stop, batch_size=self.batch_size,
                               rounds=rounds, transform=self.transform, max_pixels=self.max_image_pixels)
        loader = worker_loader(dataset, self.num_workers, multiprocessing_context=self.multiprocessing_context)
        expected = 0
        pending = zero_counts()  # issues of batches that lost every sample ride on the next batch
        for item in loader:
            if item["index"] != expected:
                raise RuntimeError(f"eval batch order broken: expected {expected}, got {item['index']}")
            expected += 1
            deltas, _ = self._tally.add(item["events"], [])
            pending = {k: pending[k] + deltas[k] for k in pending}
            if not item["keys"]:
                continue
            yield {
                "keys": item["keys"],
                "labels": torch.tensor(item["labels"], dtype=torch.long),
                "images": torch.stack(item["images"]),
                "data_errors": pending,
            }
            pending = zero_counts()


def build_eval_stream(
    urls_or_dir: ShardSpec,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    transform: EvalTransform,
    num_workers: int,
    split: str | None = None,
    allow_pipe: bool = False,
    shard_sizes: Mapping[str, int] | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    multiprocessing_context: str | None = None,
) -> EvalStream:
    """Evaluation batches of rank ``rank``: each sample exactly once across ranks, in manifest order."""
    shards = resolve_shard_set(urls_or_dir, split=split, allow_pipe=allow_pipe, shard_sizes=shard_sizes)
    return EvalStream(shards, batch_size=batch_size, rank=rank, world_size=world_size, transform=transform,
                      num_workers=num_workers, max_image_pixels=max_image_pixels,
                      multiprocessing_context=multiprocessing_context)
