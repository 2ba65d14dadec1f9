"""Load, validate and resolve a run config: defaults <- recipe YAML <- CLI overrides.

All checks run here, before any process group, CUDA initialisation or file write, and every failure is one
:class:`ConfigError` naming the dotted key, the bad value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from ssl_vil.config.errors import ConfigError
from ssl_vil.config.schema import DerivedConfig, RunConfig

# Keys that may differ when an existing run dir is resumed: they change how, not what, is computed.
RESUME_MUTABLE_PREFIXES = (
    "data.num_workers",
    "dist.",
    "logging.",
    "checkpoint.keep_last",
    "checkpoint.keep_every_steps",
    "guards.watchdog_timeout_s",
    "train.compile",
    "train.device",
    "eval.",
    "derived.",
)


# ----------------------------------------------------------------------------------------------- type checking
def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_type_name(args[0])}"
        return f"a list of {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key}: got {value!r}, expected {expected}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (e.g. int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise _fail(key, value, _type_name(tp))
    if origin is Literal:
        if value in get_args(tp):
            return value
        choices = [str(a) for a in get_args(tp)]
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, _type_name(tp))
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _fail(key, value, _type_name(tp))
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, value, "bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _fail(key, value, "int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                f = float(value)
            except ValueError:
                raise _fail(key, value, "float") from None
            if math.isfinite(f):
                return f
        raise _fail(key, value, "float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, value, "str")
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # schema bug, not user input


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        out.append(dotted)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_all_keys(hints[f.name], dotted + "."))
    return out


def _unknown_key(key: str, cls: type, prefix: str) -> ConfigError:
    here = [f"{prefix}{f.name}" for f in dataclasses.fields(cls)]
    near = difflib.get_close_matches(key, here, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, _all_keys(RunConfig), n=1, cutoff=0.75
    )
    hint = f"; did you mean {near[0]}?" if near else f"; valid keys here: {', '.join(here)}"
    return ConfigError(f"{key}: unknown key{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from nested ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise _fail(prefix.rstrip(".") or "<root>", data, "a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _unknown_key(f"{prefix}{k}", cls, prefix)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- dict plumbing
def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) of a config dataclass."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001); the value is parsed as a YAML scalar or list."""
    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key.strip().split("."), value


def _overrides_to_dict(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path)}: conflicts with an earlier override of {p}")
            node = nxt
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r}: not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at top level, got {type(data).__name__}")
    return data


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


# ------------------------------------------------------------------------------------------------ resolution
def _duration_steps(cfg: RunConfig, group: str, *, required: bool, samples_per_epoch: int | None) -> int:
    """Convert the one set unit of ``schedule.<group>_{steps,samples,epochs}`` to optimizer steps."""
    s = cfg.schedule
    units = {u: getattr(s, f"{group}_{u}") for u in ("steps", "samples", "epochs")}
    given = {u: v for u, v in units.items() if v is not None}
    if len(given) > 1:
        keys = ", ".join(f"schedule.{group}_{u}={v!r}" for u, v in given.items())
        raise ConfigError(f"schedule.{group}_*: got {keys}; expected exactly one of {group}_steps, "
                          f"{group}_samples, {group}_epochs")
    if not given:
        if required:
            raise ConfigError(f"schedule.{group}_*: none set; expected exactly one of {group}_steps, "
                              f"{group}_samples, {group}_epochs")
        return 0
    unit, value = next(iter(given.items()))
    key = f"schedule.{group}_{unit}"
    if value < 0 or (required and value == 0):
        raise _fail(key, value, "a positive number" if required else "a non-negative number")
    batch = cfg.optim.global_batch_size
    if unit == "steps":
        return int(value)
    if unit == "samples":
        return math.ceil(value / batch)
    if samples_per_epoch is None:
        raise ConfigError(f"{key}: got {value!r}, but the epoch size is unknown; set data.samples_per_epoch "
                          f"or point data.train at shards with a manifest")
    return math.ceil(value * samples_per_epoch / batch)


def _manifest_samples(train: str) -> int | None:
    """Sample count from the shard writer's manifest, when data.train is a local shard directory with one split."""
    if not train or not Path(train).is_dir():
        return None
    from ssl_vil.data.manifest import read_manifest

    return read_manifest(train).num_samples


def _known_models() -> list[str]:
    import timm

    import ssl_vil  # noqa: F401  (registers the ViL family)

    return sorted(set(timm.list_models("vil*")))


def validate_and_resolve(cfg: RunConfig, *, world_size: int) -> RunConfig:
    """Cross-field checks and derived values; returns ``cfg`` with ``cfg.derived`` filled in."""
    m, o, d, a, opt, ck = cfg.model, cfg.objective, cfg.data, cfg.data.augment, cfg.optim, cfg.checkpoint

    models = _known_models()
    if m.name not in models:
        near = difflib.get_close_matches(m.name, models, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"model.name: got {m.name!r}, expected a registered ViL model: {', '.join(models)}{hint}")
    for key, value in [("model.patch_size", m.patch_size), ("optim.global_batch_size", opt.global_batch_size),
                       ("optim.grad_accum_steps", opt.grad_accum_steps), ("data.augment.global_size", a.global_size),
                       ("data.augment.n_global", a.n_global), ("checkpoint.every_steps", ck.every_steps),
                       ("logging.log_every_steps", cfg.logging.log_every_steps),
                       ("objective.dino_head.out_dim", o.dino_head.out_dim)]:
        if value <= 0:
            raise _fail(key, value, "a positive integer")
    for key, value in [("model.dim", m.dim), ("model.depth", m.depth)]:
        if value is not None and value <= 0:
            raise _fail(key, value, "a positive integer or null")
    if not 0.0 <= m.drop_path_rate < 1.0:
        raise _fail("model.drop_path_rate", m.drop_path_rate, "a value in [0, 1)")
    for key, size in [("data.augment.global_size", a.global_size), ("data.augment.local_size", a.local_size)]:
        if key.endswith("local_size") and a.n_local == 0:
            continue
        if size % m.patch_size:
            raise _fail(key, size, f"a multiple of model.patch_size={m.patch_size}")
    if a.n_local < 0:
        raise _fail("data.augment.n_local", a.n_local, "a non-negative integer")
    if o.name in ("ibot", "dinov2") and a.n_global < 1:
        raise _fail("data.augment.n_global", a.n_global, "at least 1 for masked-patch objectives")
    for key, (lo, hi) in [("data.augment.global_scale", a.global_scale), ("data.augment.local_scale", a.local_scale)]:
        if not 0.0 < lo <= hi <= 1.0:
            raise _fail(key, [lo, hi], "[min, max] with 0 < min <= max <= 1")
    if not 0.0 <= o.mask_probability <= 1.0:
        raise _fail("objective.mask_probability", o.mask_probability, "a probability in [0, 1]")
    if not 0.0 <= o.mask_ratio_min <= o.mask_ratio_max <= 1.0:
        raise _fail("objective.mask_ratio_max", o.mask_ratio_max,
                    f"a ratio in [objective.mask_ratio_min={o.mask_ratio_min}, 1]")
    for key, value in [("objective.student_temp", o.student_temp), ("objective.teacher_temp", o.teacher_temp),
                       ("objective.warmup_teacher_temp", o.warmup_teacher_temp)]:
        if value <= 0:
            raise _fail(key, value, "a positive temperature")
    if not 0.0 <= o.center_momentum < 1.0:
        raise _fail("objective.center_momentum", o.center_momentum, "a momentum in [0, 1)")
    if not 0.0 <= opt.momentum_start <= opt.momentum_end <= 1.0:
        raise _fail("optim.momentum_start", opt.momentum_start, f"0 <= momentum_start <= optim.momentum_end={opt.momentum_end} <= 1")
    if o.shared_head:
        if o.name != "dinov2" and o.name != "ibot":
            raise _fail("objective.shared_head", True, f"false for objective.name={o.name!r} (no iBOT head)")
        from ssl_vil.backbones.pooling import pooled_dim

        import timm

        import torch

        with torch.device("meta"):  # only the width is needed: no allocation, no init
            dim = m.dim or timm.create_model(m.name, pretrained=False, num_classes=0).embed_dim
        if pooled_dim(dim, o.pooling) != dim:
            raise ConfigError(f"objective.shared_head: got True, but the DINO head sees {o.pooling!r} features of "
                              f"width {pooled_dim(dim, o.pooling)} and the iBOT head patch tokens of width {dim}; "
                              f"expected shared_head=false or objective.pooling='bilateral_avg'/'avg'")
    if o.shared_head and o.dino_head != o.ibot_head:
        raise ConfigError("objective.shared_head: got True with different dino_head and ibot_head settings; "
                          "expected identical head settings")
    if opt.lr <= 0:
        raise _fail("optim.lr", opt.lr, "a positive learning rate")
    if opt.min_lr < 0 or opt.min_lr > opt.lr:
        raise _fail("optim.min_lr", opt.min_lr, f"a value in [0, optim.lr={opt.lr}]")
    if opt.clip_grad_norm is not None and opt.clip_grad_norm <= 0:
        raise _fail("optim.clip_grad_norm", opt.clip_grad_norm, "a positive norm or null")
    if not 0.0 < opt.layer_decay <= 1.0:
        raise _fail("optim.layer_decay", opt.layer_decay, "a value in (0, 1]")
    if ck.keep_last < 2:
        raise _fail("checkpoint.keep_last", ck.keep_last, "at least 2 (the newest is never the only fallback)")
    if ck.keep_every_steps is not None and ck.keep_every_steps <= 0:
        raise _fail("checkpoint.keep_every_steps", ck.keep_every_steps, "a positive number of steps or null")
    if cfg.guards.max_consecutive_skips < 0:
        raise _fail("guards.max_consecutive_skips", cfg.guards.max_consecutive_skips, "a non-negative integer")
    if not 0.0 <= d.error_budget_fraction <= 1.0:
        raise _fail("data.error_budget_fraction", d.error_budget_fraction, "a fraction in [0, 1]")
    if d.num_workers < 0:
        raise _fail("data.num_workers", d.num_workers, "a non-negative integer")
    if d.train.startswith("pipe:") and not d.allow_pipe:
        raise _fail("data.train", d.train, "a path or URL; pipe: URLs run shell commands and need data.allow_pipe=true")
    ev = cfg.eval
    if ev.knn_every_steps < 0:
        raise _fail("eval.knn_every_steps", ev.knn_every_steps, "0 (off) or a positive number of steps")
    if not ev.knn_k or any(k <= 0 for k in ev.knn_k):
        raise _fail("eval.knn_k", ev.knn_k, "a non-empty list of positive integers")
    if ev.knn_every_steps and not (ev.knn_train and ev.knn_val):
        raise _fail("eval.knn_train", ev.knn_train, "shard paths in eval.knn_train and eval.knn_val when "
                    "eval.knn_every_steps > 0")

    if world_size <= 0:
        raise ConfigError(f"WORLD_SIZE: got {world_size!r}, expected a positive integer")
    per_rank, rem = divmod(opt.global_batch_size, world_size * opt.grad_accum_steps)
    if rem or per_rank == 0:
        raise _fail("optim.global_batch_size", opt.global_batch_size,
                    f"a positive multiple of world_size × optim.grad_accum_steps = {world_size} × {opt.grad_accum_steps}")

    samples_per_epoch = d.samples_per_epoch
    uses_epochs = any(getattr(cfg.schedule, f.name) is not None for f in dataclasses.fields(cfg.schedule)
                      if f.name.endswith("_epochs"))
    if samples_per_epoch is None and uses_epochs:  # only an epoch-sized schedule needs the data's size
        samples_per_epoch = _manifest_samples(d.train)
    if samples_per_epoch is not None and samples_per_epoch <= 0:
        raise _fail("data.samples_per_epoch", samples_per_epoch, "a positive integer")
    total = _duration_steps(cfg, "total", required=True, samples_per_epoch=samples_per_epoch)
    derived_steps = {}
    for group in ("warmup", "teacher_temp_warmup", "freeze_last_layer"):
        n = _duration_steps(cfg, group, required=False, samples_per_epoch=samples_per_epoch)
        if n > total:
            unit = next(u for u in ("steps", "samples", "epochs") if getattr(cfg.schedule, f"{group}_{u}") is not None)
            raise _fail(f"schedule.{group}_{unit}", getattr(cfg.schedule, f"{group}_{unit}"),
                        f"at most the run length ({total} steps)")
        derived_steps[group] = n

    scale = opt.global_batch_size / opt.lr_reference_batch_size
    factor = {"linear": scale, "sqrt": math.sqrt(scale), "none": 1.0}[opt.lr_scaling]
    cfg.derived = DerivedConfig(
        world_size=world_size,
        per_rank_batch_size=opt.global_batch_size // world_size,
        micro_batch_size=per_rank,
        peak_lr=opt.lr * factor,
        samples_per_epoch=samples_per_epoch,
        total_steps=total,
        warmup_steps=derived_steps["warmup"],
        teacher_temp_warmup_steps=derived_steps["teacher_temp_warmup"],
        freeze_last_layer_steps=derived_steps["freeze_last_layer"],
    )
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                world_size: int | None = None) -> RunConfig:
    """defaults <- YAML at ``path`` <- ``overrides`` (``key.sub=value``), validated and resolved.

    ``world_size`` defaults to the ``WORLD_SIZE`` environment variable (1 when unset). A ``derived`` section in
    the YAML (from a run's config.yaml) is ignored and recomputed.
    """
    data = read_yaml(path) if path is not None else {}
    data = _deep_merge(data, _overrides_to_dict(overrides or []))
    data.pop("derived", None)
    cfg = _build(RunConfig, data)
    if world_size is None:
        raw = os.environ.get("WORLD_SIZE", "1")
        try:
            world_size = int(raw)
        except ValueError:
            raise ConfigError(f"WORLD_SIZE: got {raw!r}, expected a positive integer") from None
    return validate_and_resolve(cfg, world_size=world_size)


def diff_configs(a: RunConfig, b: RunConfig, *, ignore_prefixes: tuple[str, ...] = RESUME_MUTABLE_PREFIXES
                 ) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two configs, skipping keys that may change on resume."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys())
            if fa.get(k) != fb.get(k) and not any(k == p or k.startswith(p) for p in ignore_prefixes)]
