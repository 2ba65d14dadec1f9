"""Segmentation pairs as training batches (shuffled, sharded over ranks, resumable at any batch) and as
evaluation batches.

The contract is the fine-tuning streams' (:class:`ssl_vil.data.cursor.ResumableStream`): the order of an epoch is
a pure function of ``(seed, epoch, global batch size)``, rank ``r`` takes samples ``[r*B, (r+1)*B)`` of every
global batch, each sample's augmentation is seeded from ``(seed, epoch, sample)``, and the cursor ``(epoch,
batches consumed)`` is saved with ``state_dict()``. Train batches are ``{"keys", "images" (B, 3, c, c), "masks"
(B, c, c) int64, "epoch", "batch_in_epoch"}``.

A pair that cannot be used (undecodable image or mask, mask size differing from the image, a mask value that is
neither a class index nor the ignore index) stops the run with one message naming its key: a segmentation set
has no use for silently dropped or clipped labels.
"""

from __future__ import annotations

import io
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from ssl_vil.data.cursor import EpochCursor, ResumableStream
from ssl_vil.data.decode import DEFAULT_MAX_IMAGE_PIXELS, SampleIssue, decode_image
from ssl_vil.data.errors import DataConfigError
from ssl_vil.data.seeding import make_generator, stable_seed
from ssl_vil.segment.transforms import SegEvalTransform, SegTrainTransform

SEG_CURSOR_FORMAT = "ssl_vil.segment.cursor/1"


def decode_pair(pairs: Any, index: int, num_classes: int, ignore_index: int) -> tuple[str, Image.Image, np.ndarray]:
    """Pair ``index`` as (key, RGB image, (H, W) uint8 mask); :class:`DataConfigError` naming the key otherwise."""
    pair = pairs[index]
    where = f"{pairs.source} [{pair.key}]"
    try:
        image = decode_image(pair.image, url=pairs.source, record=index, key=pair.key,
                             max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    except SampleIssue as exc:
        raise DataConfigError(f"{where}: image: {exc}") from None
    try:
        with Image.open(io.BytesIO(pair.mask)) as raw:
            if raw.mode not in ("L", "P"):
                raise DataConfigError(f"{where}: mask has mode {raw.mode}; expected an 8-bit single-channel PNG "
                                      "(mode L or P) holding one class index per pixel")
            mask = np.asarray(raw, dtype=np.uint8).copy()
    except DataConfigError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt bytes
        raise DataConfigError(f"{where}: mask does not decode: {type(exc).__name__}: {exc}") from None
    if mask.shape != (image.height, image.width):
        raise DataConfigError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} px but the image is "
                              f"{image.width}x{image.height}")
    values = np.unique(mask)
    bad = [int(v) for v in values if v >= num_classes and v != ignore_index]
    if bad:
        raise DataConfigError(f"{where}: mask values {bad[:5]} are neither class indices 0..{num_classes - 1} nor "
                              f"the ignore index {ignore_index} (model.num_classes / data.ignore_index)")
    return pair.key, image, mask


class _TrainSamples(torch.utils.data.Dataset):
    """Pairs at ``positions``, transformed with per-sample seeds; errors travel as text to the main process
    (an exception raised in a loader worker reaches the user wrapped in a traceback)."""

    def __init__(self, pairs: Any, positions: list[int], transform: SegTrainTransform, seed: int, epoch: int,
                 num_classes: int, ignore_index: int) -> None:
        self.pairs, self.positions, self.transform = pairs, positions, transform
        self.seed, self.epoch, self.num_classes, self.ignore_index = seed, epoch, num_classes, ignore_index

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.positions[i]
        try:
            key, image, mask = decode_pair(self.pairs, index, self.num_classes, self.ignore_index)
        except DataConfigError as exc:
            return {"error": str(exc)}
        generator = make_generator(stable_seed(self.seed, "seg-sample", self.epoch, index))
        x, y = self.transform(image, mask, generator)
        return {"key": key, "image": x, "mask": y}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [item["error"] for item in items if "error" in item]
    if errors:
        return {"errors": errors}
    return {"keys": [item["key"] for item in items], "images": torch.stack([item["image"] for item in items]),
            "masks": torch.stack([item["mask"] for item in items])}


class SegTrainStream(ResumableStream):
    """One rank's shuffled training batches of segmentation pairs (contract: module docstring)."""

    cursor_format = SEG_CURSOR_FORMAT
    stream_name = "segmentation stream"

    def __init__(self, pairs: Any, *, transform: SegTrainTransform, batch_size: int, seed: int, rank: int,
                 world_size: int, num_workers: int, num_classes: int, ignore_index: int) -> None:
        self.pairs, self.transform = pairs, transform
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.num_classes, self.ignore_index = num_workers, num_classes, ignore_index
        n = len(pairs)
        batches = n // self.global_batch_size  # drop_last: every step a full global batch
        if batches == 0:
            raise DataConfigError(f"{pairs.source}: {n} pairs are fewer than one global batch of "
                                  f"{self.global_batch_size} (data.batch_size {batch_size} x world size {world_size})")
        self._cursor = EpochCursor(batches)

    def _fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_samples": len(self.pairs)}

    def _epoch_batches(self, epoch: int, first: int) -> Generator[dict[str, Any], None, None]:
        order = torch.randperm(len(self.pairs), generator=make_generator(stable_seed(self.seed, "seg-order", epoch)))
        order = order.tolist()
        g, b = self.global_batch_size, self.batch_size
        positions = [order[s * g + self.rank * b + j] for s in range(first, self.batches_per_epoch) for j in range(b)]
        loader = torch.utils.data.DataLoader(
            _TrainSamples(self.pairs, positions, self.transform, self.seed, epoch, self.num_classes,
                          self.ignore_index),
            batch_size=b, shuffle=False, num_workers=self.num_workers, persistent_workers=False, collate_fn=_collate,
        )
        for index, batch in enumerate(loader, start=first):
            if "errors" in batch:
                raise DataConfigError(batch["errors"][0])
            yield {**batch, "epoch": epoch, "batch_in_epoch": index}


class _EvalSamples(torch.utils.data.Dataset):
    def __init__(self, pairs: Any, indices: list[int], transform: SegEvalTransform, num_classes: int,
                 ignore_index: int) -> None:
        self.pairs, self.indices, self.transform = pairs, indices, transform
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            key, image, mask = decode_pair(self.pairs, self.indices[i], self.num_classes, self.ignore_index)
        except DataConfigError as exc:
            return {"error": str(exc)}
        x, y = self.transform(image, mask)
        return {"key": key, "image": x, "mask": y}


def _collate_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [item["error"] for item in items if "error" in item]
    if errors:
        return {"errors": errors}
    return {"keys": [item["key"] for item in items], "images": [item["image"] for item in items],
            "masks": [item["mask"] for item in items]}


def eval_batches(pairs: Any, *, transform: SegEvalTransform, batch_size: int, rank: int, world_size: int,
                 num_workers: int, num_classes: int, ignore_index: int) -> Iterator[dict[str, Any]]:
    """This rank's share (every ``world_size``-th pair from ``rank``) of all pairs, in order, as lists of
    (3, H, W) images and (H, W) masks (sizes may differ between images)."""
    indices = list(range(rank, len(pairs), world_size))
    loader = torch.utils.data.DataLoader(_EvalSamples(pairs, indices, transform, num_classes, ignore_index),
                                         batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate_list)
    for batch in loader:
        if "errors" in batch:
            raise DataConfigError(batch["errors"][0])
        yield batch
