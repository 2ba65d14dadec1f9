"""Load, validate and resolve a run config: defaults <- recipe YAML <- CLI overrides (:mod:`ssl_vil.config.engine`).

All checks run here, before any process group, CUDA initialisation or file write, and every failure is one
:class:`ConfigError` naming the dotted key, the bad value and what was expected. Resolving fills the ``derived``
section once (world size, per-rank batch, peak lr, durations in steps); the trainer reads those.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ssl_vil.config import engine
from ssl_vil.config.errors import ConfigError, invalid
from ssl_vil.config.schema import DataConfig, DerivedConfig, RunConfig
from ssl_vil.config.upgrade import upgrade_record
from ssl_vil.schedules import scale_lr

log = logging.getLogger("ssl_vil.config")

# Keys that may differ when an existing run dir is resumed: where the data lives, how long the run is (to extend
# it), cadence of logging / checkpoints / the k-NN monitor, and process settings. Everything else decides what is
# computed (model shapes, objective, optimizer, data stream order) and must match the run's recorded config.
RESUME_MUTABLE_KEYS = (
    "data.train",
    "data.num_workers",
    "data.shard_sizes",
    "schedule.total_steps",
    "schedule.total_samples",
    "schedule.total_epochs",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "checkpoint.keep_every_steps",
    "logging.",
    "knn_monitor.",
    "guards.watchdog_timeout_s",
    "dist.",
    "train.compile",
    "train.distributed",  # checkpoints hold full tensors either way (ssl_vil.train.fsdp)
    "train.device",
    "derived.",
)

# Keys of earlier versions of the schema, named in the error instead of a did-you-mean.
MOVED_KEYS = {
    "objective.name": "removed: DINO, iBOT and DINOv2 are settings of objective.ibot_weight and "
                      "objective.koleo_weight (DINO: both 0; iBOT: koleo_weight 0), stated in the recipes",
    "objective.mask_probability": "moved to masking.mask_probability",
    "objective.mask_ratio_min": "moved to masking.mask_ratio ([min, max])",
    "objective.mask_ratio_max": "moved to masking.mask_ratio ([min, max])",
    "objective.mask_mode": "moved to masking.mode",
    "optim.name": "removed: the optimizer is AdamW",
    "eval": "renamed to knn_monitor (every_steps, train, val, k, temperature, batch_size: the old names "
            "without the knn_ prefix)",
}


def _manifest_samples(d: DataConfig) -> int | None:
    """Sample count of data.train (its shards' sidecars, or an image folder's files), when it is set."""
    if not d.train:
        return None
    from ssl_vil.train.data import train_data

    return train_data(d).num_samples


def resolve(cfg: RunConfig, *, world_size: int) -> RunConfig:
    """Fill ``cfg.derived`` for ``world_size`` processes (the checks that need it run here); returns ``cfg``."""
    opt, d = cfg.optim, cfg.data
    if world_size <= 0:
        raise ConfigError(f"WORLD_SIZE: got {world_size!r}, expected a positive integer")
    per_rank, rem = divmod(opt.global_batch_size, world_size * opt.grad_accum_steps)
    if rem or per_rank == 0:
        raise invalid("optim.global_batch_size", opt.global_batch_size,
                      f"a positive multiple of world_size × optim.grad_accum_steps = {world_size} × "
                      f"{opt.grad_accum_steps}")
    samples_per_epoch = d.samples_per_epoch
    if samples_per_epoch is None and cfg.schedule.uses_epochs:  # only an epoch-sized schedule needs the data's size
        samples_per_epoch = _manifest_samples(d)
        if samples_per_epoch is not None and samples_per_epoch <= 0:
            raise invalid("data.samples_per_epoch", samples_per_epoch, "a positive integer (from the manifest)")
    try:
        steps = cfg.schedule.resolve_steps(global_batch_size=opt.global_batch_size,
                                           samples_per_epoch=samples_per_epoch)
    except ConfigError as err:
        raise err.within("schedule") from None
    cfg.derived = DerivedConfig(
        world_size=world_size,
        per_rank_batch_size=opt.global_batch_size // world_size,
        micro_batch_size=per_rank,
        peak_lr=scale_lr(opt.lr, opt.global_batch_size, reference_batch_size=opt.lr_reference_batch_size,
                         rule=opt.lr_scaling),
        samples_per_epoch=samples_per_epoch,
        total_steps=steps["total"],
        warmup_steps=steps["warmup"],
        teacher_temp_warmup_steps=steps["teacher_temp_warmup"],
        freeze_last_layer_steps=steps["freeze_last_layer"],
    )
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                world_size: int | None = None) -> RunConfig:
    """defaults <- YAML at ``path`` <- ``overrides`` (``key.sub=value``), validated and resolved.

    ``world_size`` defaults to the ``WORLD_SIZE`` environment variable (1 when unset). A ``derived`` section in
    the YAML (from a run's config.yaml) is ignored and recomputed.
    """
    cfg = engine.load(RunConfig, path, overrides or [], drop=("derived",), moved=MOVED_KEYS, prepare=_if_recorded)
    if world_size is None:
        raw = os.environ.get("WORLD_SIZE", "1")
        try:
            world_size = int(raw)
        except ValueError:
            raise ConfigError(f"WORLD_SIZE: got {raw!r}, expected a positive integer") from None
    return resolve(cfg, world_size=world_size)


def diff_configs(a: RunConfig, b: RunConfig, *, ignore_prefixes: tuple[str, ...] = RESUME_MUTABLE_KEYS
                 ) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two configs, skipping keys that may change on resume."""
    return engine.diff(a, b, ignore_prefixes=ignore_prefixes)


def describe_resume_mutable_keys(keys: tuple[str, ...] = RESUME_MUTABLE_KEYS) -> str:
    """The keys allowed to change on resume, grouped by section: ``data.{train,num_workers}, logging.*, ...``
    (``derived.*`` is left out: it is never set by hand)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        section, _, rest = key.partition(".")
        if section != "derived":
            groups.setdefault(section, []).append(rest or "*")
    parts = []
    for section, names in groups.items():
        inner = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
        parts.append(f"{section}.{inner}")
    return ", ".join(parts)


def config_from_record(record: Mapping[str, Any]) -> RunConfig:
    """A run config rebuilt from the resolved dict a run recorded (``derived`` is dropped, not resolved); a record
    of an earlier version of ssl_vil is upgraded first (:mod:`ssl_vil.config.upgrade`).

    Raises :class:`ConfigError` when the record does not fit this version of the schema.
    """
    data = _upgraded(record)
    data.pop("derived", None)
    return engine.build(RunConfig, data, moved=MOVED_KEYS, internal=("derived",))


def _upgraded(record: Mapping[str, Any]) -> dict[str, Any]:
    data, notes = upgrade_record(record)
    if notes:
        log.info("config recorded by an earlier version of ssl_vil, read as: %s", "; ".join(notes))
    return data


def _if_recorded(data: dict[str, Any]) -> dict[str, Any]:
    """A YAML with a ``derived`` section is a config a run wrote (``RUN/config.yaml``): it is upgraded from an
    earlier version's layout like any run record; a recipe is taken as written."""
    return _upgraded(data) if "derived" in data else data


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``RUN/config.yaml`` holds)."""
    return engine.to_yaml(cfg)


to_dict = engine.to_dict
read_yaml = engine.read_yaml
parse_override = engine.parse_override
