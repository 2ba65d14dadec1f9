"""Training inputs for supervised fine-tuning: shuffled, sharded over ranks, resumable at any batch.

Shards use :func:`ssl_vil.data.train_stream.build_train_stream` (epoch mode, ``drop_last``). An ImageFolder gets
:class:`ImageFolderTrainStream` with the same contract: the order of an epoch is a pure function of
``(seed, epoch, global batch size)``, rank ``r`` takes samples ``[r*B, (r+1)*B)`` of every global batch, each
sample's augmentation is seeded from ``(seed, epoch, sample)``, and the cursor ``(epoch, batches consumed)`` is
saved with ``state_dict()``. Batches are ``{"keys", "labels" (B,), "views" (B, 3, H, W), "epoch",
"batch_in_epoch"}`` plus, for an ImageFolder, ``"padded"`` (B,) bool and ``"data_errors"`` as the shard stream
has them: images are decoded by :func:`ssl_vil.data.decode.decode_image` like shard records, and an image that
does not decode is counted, reported and replaced by a copy of another sample of its batch (``padded``), within
the same error budget as the shard stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ssl_vil.data.cursor import EpochCursor, ResumableStream
from ssl_vil.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from ssl_vil.data.error_tally import ErrorTally
from ssl_vil.data.errors import DataError, DataIssue
from ssl_vil.data.seeding import make_generator, stable_seed
from ssl_vil.data.sources import image_folder_classes, image_folder_files
from ssl_vil.eval.inputs import FolderImages, is_image_folder

IMAGEFOLDER_CURSOR_FORMAT = "ssl_vil.evaluation.imagefolder_cursor/1"


class SeededTransform:
    """Run a transform that draws from the global RNGs (timm's RandAugment, RandomErasing...) under a seed taken
    from ``generator``, leaving the process's RNG states as they were.

    The augmentation of a sample then depends only on its seed, not on which worker ran it or what ran before:
    the property that makes a resumed run see exactly the views an uninterrupted one sees.
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Any, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.manual_seed(seed)
                return self.transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


_Item = tuple[torch.Tensor | None, int, str, DataIssue | None]


class _EpochSamples(FolderImages):
    """Samples ``positions`` of an ImageFolder listing, transformed with per-sample seeds: (view or None, label,
    key, issue or None); a file that does not decode gives None and its :class:`DataIssue`."""

    def __init__(self, root: Path, samples: list[tuple[Path, int]], positions: list[int],
                 transform: SeededTransform, seed: int, epoch: int, max_pixels: int) -> None:
        super().__init__(root, samples, positions, transform, max_pixels)
        self.seed, self.epoch = seed, epoch

    def __getitem__(self, i: int) -> _Item:
        image, label, key, issue = self.read(i)
        if image is None:
            return None, label, key, issue
        generator = make_generator(stable_seed(self.seed, "imagefolder-sample", self.epoch, self.indices[i]))
        return self.transform(image, generator), label, key, None


def _collate_padded(items: list[_Item]) -> dict[str, Any]:
    """Stack a batch; each undecodable sample is replaced by the next good one of the batch (cyclically)."""
    good = [j for j, item in enumerate(items) if item[0] is not None]
    if not good:
        raise DataError("no image of this batch decodes: " + "; ".join(item[3].describe() for item in items
                                                                       if item[3] is not None))
    fill = [j if items[j][0] is not None else next((g for g in good if g > j), good[0]) for j in range(len(items))]
    return {"keys": [items[f][2] for f in fill], "labels": torch.tensor([items[f][1] for f in fill], dtype=torch.long),
            "views": torch.stack([items[f][0] for f in fill]),
            "padded": torch.tensor([f != j for j, f in enumerate(fill)], dtype=torch.bool),
            "events": [item[3] for item in items if item[3] is not None]}


class ImageFolderTrainStream(ResumableStream):
    """One rank's shuffled training batches from an ImageFolder directory (contract: module docstring)."""

    cursor_format = IMAGEFOLDER_CURSOR_FORMAT
    stream_name = "ImageFolder stream"

    def __init__(self, root: str, *, transform: SeededTransform, batch_size: int, seed: int, rank: int,
                 world_size: int, num_workers: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 error_budget_fraction: float | None = 0.01) -> None:
        self.root = Path(root)
        self._classes, self.samples = image_folder_files(self.root)
        self.transform = transform
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers = num_workers
        self.max_image_pixels = max_image_pixels
        n = len(self.samples)
        self._batches_per_epoch = n // self.global_batch_size  # drop_last: every step a full global batch
        if self._batches_per_epoch == 0:
            raise ValueError(f"{root}: {n} images are fewer than one global batch of {self.global_batch_size} "
                             f"(batch_size {batch_size} x world_size {world_size})")
        self._cursor = EpochCursor(self._batches_per_epoch)
        self._tally = ErrorTally(budget_fraction=error_budget_fraction,
                                 planned_per_epoch=self._batches_per_epoch * batch_size, rank=rank)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self._classes)

    @property
    def error_totals(self) -> dict[str, int]:
        return dict(self._tally.totals)

    def _fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_samples": len(self.samples)}

    def _epoch_batches(self, epoch: int, first: int) -> Generator[dict[str, Any], None, None]:
        if first == 0:
            self._tally.new_epoch()
        order = torch.randperm(len(self.samples),
                               generator=make_generator(stable_seed(self.seed, "imagefolder-order", epoch))).tolist()
        g, b = self.global_batch_size, self.batch_size
        positions = [order[s * g + self.rank * b + j]
                     for s in range(first, self._batches_per_epoch) for j in range(b)]
        loader = torch.utils.data.DataLoader(
            _EpochSamples(self.root, self.samples, positions, self.transform, self.seed, epoch,
                          self.max_image_pixels),
            batch_size=b, shuffle=False, num_workers=self.num_workers, persistent_workers=False,
            collate_fn=_collate_padded,
        )
        for index, batch in enumerate(loader, start=first):
            events = batch.pop("events")
            deltas, _ = self._tally.add(events, [e.url for e in events])
            self._tally.check_budget()
            yield {**batch, "data_errors": deltas, "epoch": epoch, "batch_in_epoch": index}


def open_train_stream(source: str, *, transform: Callable[[Any], torch.Tensor], batch_size: int, seed: int,
                      rank: int, world_size: int, num_workers: int, split: str | None = None) -> Any:
    """ImageFolder or shard training stream (same contract, see the module docstring)."""
    seeded = SeededTransform(transform)
    if is_image_folder(source):
        return ImageFolderTrainStream(source, transform=seeded, batch_size=batch_size, seed=seed, rank=rank,
                                      world_size=world_size, num_workers=num_workers)
    from ssl_vil.data.train_stream import build_train_stream

    return build_train_stream(source, mode="epoch", batch_size=batch_size, seed=seed, rank=rank,
                              world_size=world_size, num_workers=num_workers, transform=seeded, split=split,
                              drop_last=True)


def source_classes(source: str, split: str | None = None) -> tuple[str, ...]:
    """Class names of a training source without reading images: ImageFolder sub-directories or the shard
    manifest's ``classes`` (empty when the shards do not name them)."""
    if is_image_folder(source):
        return tuple(image_folder_classes(Path(source)))
    from ssl_vil.data.shardlist import resolve_shard_set

    return tuple(resolve_shard_set(source, split=split).classes)
