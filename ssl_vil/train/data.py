"""The trainer's data: multi-crop transform + mask collate + resumable shard stream, built from the config."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ssl_vil.augment.presets import multicrop_from_config
from ssl_vil.config import RunConfig
from ssl_vil.config.schema import DataConfig
from ssl_vil.data.errors import DataConfigError
from ssl_vil.data.shardlist import ShardSet, load_shard_sizes
from ssl_vil.data.train_stream import TrainStream, resolve_train_data
from ssl_vil.infra.dist import DistInfo
from ssl_vil.objectives.masking import MultiCropMaskCollate


def build_stream(cfg: RunConfig, dist: DistInfo) -> TrainStream:
    """One rank's stream of micro-batches (``derived.micro_batch_size`` each; a step takes ``grad_accum_steps``)."""
    a, d = cfg.data.augment, cfg.data
    transform = multicrop_from_config(a)
    collate = multicrop_collate(cfg)
    shards = train_data(d)
    try:
        return TrainStream(
            shards, mode=d.mode, batch_size=cfg.derived.micro_batch_size, seed=cfg.train.seed, rank=dist.rank,
            world_size=dist.world_size, num_workers=d.num_workers, transform=transform, collate=collate,
            samples_per_epoch=d.samples_per_epoch, error_budget_fraction=d.error_budget_fraction,
            max_image_pixels=d.max_image_pixels, shuffle_window_samples=d.shuffle_window_samples,
            budget_error="attach")  # the step guard stops every rank at the same step
    except DataConfigError as err:
        raise (err.within("data") if err.key else err) from None


def multicrop_collate(cfg: RunConfig) -> MultiCropMaskCollate:
    """The collate of the run's multi-crop views, with the iBOT block masks over the global crops' patch grid."""
    a = cfg.data.augment
    grid = a.global_size // cfg.model.patch_size
    return MultiCropMaskCollate.from_config((grid, grid), a.n_global, a.n_local, cfg.masking)


def train_data(d: DataConfig) -> ShardSet:
    """The shards (or image-folder chunks) ``data.*`` names; errors name the ``data.`` key at fault."""
    try:
        sizes = load_shard_sizes(d.shard_sizes) if d.shard_sizes else None
        return resolve_train_data(d.train, split=d.split, allow_pipe=d.allow_pipe, shard_sizes=sizes)
    except DataConfigError as err:
        raise (err.within("data") if err.key else err) from None


def batches_forever(stream: TrainStream) -> Iterator[dict[str, Any]]:
    """Epoch after epoch; iterating the stream yields the rest of its current epoch, from its cursor.

    The stream's randomness is seeded from (seed, epoch, key), but starting a DataLoader draws a base seed from
    the global torch RNG, and a resumed run starts one more loader than an uninterrupted one. Fetching under
    ``fork_rng`` keeps the trainer's RNG stream (drop path) identical either way.
    """
    while True:
        it = iter(stream)
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(it, None)
            if batch is None:
                break
            yield batch

