"""Sharded WebDataset input for self-supervised pretraining and evaluation.

Interfaces:

- A *transform* is ``Callable[[PIL.Image.Image, torch.Generator], Any]`` (e.g. a multi-crop returning a list of
  tensors). The training stream seeds a fresh generator per sample from ``(seed, epoch, sample key)`` with
  BLAKE2b (never ``hash()``), so augmentations do not depend on ``num_workers`` or the topology.
- A *collate* is ``Callable[[list[dict], torch.Generator], dict]``; samples are ``{"key": str, "label": int (-1 if
  none), "views": <transform output>}``; the generator is seeded from ``(seed, epoch, global batch index)`` and
  the rank's first slot (so ranks draw independent masks). :func:`default_collate_views` stacks the views.
- :func:`build_train_stream` -> :class:`TrainStream`: epoch mode (exactly once per epoch, equal steps on every
  rank, explicit padding in ``batch["padded"]``) or resampled mode (endless sampling with replacement), with a
  topology-free resumable cursor (``state_dict`` / ``load_state_dict``), typed bad-data counters in
  ``batch["data_errors"]`` and an error budget. The design (slots of the global batch) is described in
  :mod:`ssl_vil.data.train_stream` and :mod:`ssl_vil.data.layout`.
- :func:`build_eval_stream` -> :class:`EvalStream`: every sample exactly once across ranks, fixed order.
- :func:`resolve_shards`, :func:`read_manifest`; shards are written by ``python -m ssl_vil.data.make_shards``.
"""

from typing import TYPE_CHECKING

from ssl_vil.infra.lazy_exports import lazy_getattr

if TYPE_CHECKING:
    from ssl_vil.data.collate import default_collate_views, stack_views
    from ssl_vil.data.decode import DEFAULT_MAX_IMAGE_PIXELS, to_rgb
    from ssl_vil.data.error_tally import COUNTER_KEYS, reduce_error_counts
    from ssl_vil.data.errors import (
        ERROR_CATEGORIES,
        LOST_SAMPLES,
        DataConfigError,
        DataError,
        DataErrorBudgetExceeded,
        DataIssue,
    )
    from ssl_vil.data.eval_stream import EvalStream, build_eval_stream
    from ssl_vil.data.manifest import Manifest, ShardInfo, list_splits, read_manifest
    from ssl_vil.data.shardlist import ShardSet, count_records, resolve_shard_set, resolve_shards
    from ssl_vil.data.train_stream import TrainStream, build_train_stream

# Loaded on first use, so ``python -m ssl_vil.data.make_shards --help`` (and anything else importing one data
# module) does not pay for torch.
_LAZY = {
    "COUNTER_KEYS": "ssl_vil.data.error_tally",
    "DEFAULT_MAX_IMAGE_PIXELS": "ssl_vil.data.decode",
    "DataConfigError": "ssl_vil.data.errors",
    "DataError": "ssl_vil.data.errors",
    "DataErrorBudgetExceeded": "ssl_vil.data.errors",
    "DataIssue": "ssl_vil.data.errors",
    "ERROR_CATEGORIES": "ssl_vil.data.errors",
    "EvalStream": "ssl_vil.data.eval_stream",
    "LOST_SAMPLES": "ssl_vil.data.errors",
    "Manifest": "ssl_vil.data.manifest",
    "ShardInfo": "ssl_vil.data.manifest",
    "ShardSet": "ssl_vil.data.shardlist",
    "TrainStream": "ssl_vil.data.train_stream",
    "build_eval_stream": "ssl_vil.data.eval_stream",
    "build_train_stream": "ssl_vil.data.train_stream",
    "count_records": "ssl_vil.data.shardlist",
    "default_collate_views": "ssl_vil.data.collate",
    "list_splits": "ssl_vil.data.manifest",
    "read_manifest": "ssl_vil.data.manifest",
    "reduce_error_counts": "ssl_vil.data.error_tally",
    "resolve_shard_set": "ssl_vil.data.shardlist",
    "resolve_shards": "ssl_vil.data.shardlist",
    "stack_views": "ssl_vil.data.collate",
    "to_rgb": "ssl_vil.data.decode",
}

__all__ = [
    "COUNTER_KEYS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ERROR_CATEGORIES",
    "LOST_SAMPLES",
    "DataConfigError",
    "DataError",
    "DataErrorBudgetExceeded",
    "DataIssue",
    "EvalStream",
    "Manifest",
    "ShardInfo",
    "ShardSet",
    "TrainStream",
    "build_eval_stream",
    "build_train_stream",
    "count_records",
    "default_collate_views",
    "list_splits",
    "read_manifest",
    "reduce_error_counts",
    "resolve_shard_set",
    "resolve_shards",
    "stack_views",
    "to_rgb",
]


__getattr__ = lazy_getattr(__name__, _LAZY)
