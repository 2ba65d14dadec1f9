"""Fine-tuning recipe schema: plain YAML (``recipes/finetune_*.yaml``) + ``key.sub=value`` overrides.

Unknown keys and wrong types raise :class:`ssl_vil.config.ConfigError` naming the dotted key, before anything
is built. Durations are in epochs of the training split (``*_epochs``) or optimizer steps (``*_steps``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ssl_vil.config import ConfigError
from ssl_vil.config.load import parse_override, read_yaml, to_dict


@dataclass(kw_only=True, slots=True)
class FtModel:
    weights: str | None = None  # run dir | checkpoint folder | exported .safetensors | weights file; None: random init
    name: str | None = None  # timm name; needed without model.json (random init or bare weights file)
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm constructor overrides (random init / bare file)
    drop_path_rate: float = 0.1
    num_classes: int | None = None  # None: number of classes of the training data


@dataclass(kw_only=True, slots=True)
class FtData:
    train: str = ""  # shard dir / glob / URL, or ImageFolder directory
    val: str | None = None
    train_split: str | None = None  # default "train" when the shard dir holds several splits
    val_split: str | None = None  # default "val"
    img_size: int | None = None  # None: the pretraining size from the model info
    mean: list[float] | None = None  # None: from the model info
    std: list[float] | None = None
    batch_size: int = 64  # per process; the global batch is batch_size x world_size
    num_workers: int = 4
    eval_crop_pct: float = 0.875


@dataclass(kw_only=True, slots=True)
class FtAugment:
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm spec: rand-..., 3a, original, None
    color_jitter: float | None = None  # applied by timm only without RandAugment (e.g. with "3a")
    re_prob: float = 0.25
    re_mode: Literal["pixel", "const", "rand"] = "pixel"
    re_count: int = 1
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


@dataclass(kw_only=True, slots=True)
class FtMixup:
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(kw_only=True, slots=True)
class FtOptim:
    opt: str = "adamw"  # any timm optimizer name
    base_lr: float = 5e-4  # lr = base_lr x global_batch / 256 (MAE / BEiT linear rule)
    lr: float | None = None  # absolute lr; overrides base_lr
    weight_decay: float = 0.05
    layer_decay: float | None = 0.65  # per ViL block pair; None or 1.0: off
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad_norm: float | None = None


@dataclass(kw_only=True, slots=True)
class FtSchedule:
    train_epochs: int = 100
    warmup_epochs: int = 5
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6


@dataclass(kw_only=True, slots=True)
class FtEma:
    enabled: bool = False
    decay: float = 0.9999


@dataclass(kw_only=True, slots=True)
class FtTrain:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    checkpoint_every_steps: int = 1000  # plus one at every epoch end
    keep_last: int = 2
    eval_every_epochs: int = 1
    log_every_steps: int = 20


@dataclass(kw_only=True, slots=True)
class FinetuneConfig:
    model: FtModel = field(default_factory=FtModel)
    data: FtData = field(default_factory=FtData)
    augment: FtAugment = field(default_factory=FtAugment)
    mixup: FtMixup = field(default_factory=FtMixup)
    optim: FtOptim = field(default_factory=FtOptim)
    schedule: FtSchedule = field(default_factory=FtSchedule)
    ema: FtEma = field(default_factory=FtEma)
    train: FtTrain = field(default_factory=FtTrain)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ------------------------------------------------------------------------------------------------- building
def _expected(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_expected(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: got {value!r}, expected {_expected(tp)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for arg in get_args(tp):
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    pass
        raise bad
    if origin is Literal:
        if value in get_args(tp):
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        raise ConfigError(f"{bad}{f' (did you mean {near[0]!r}?)' if near else ''}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: got {data!r}, expected a mapping")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _validate(cfg: FinetuneConfig) -> None:
    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: got {value!r}, expected {expected}")

    need(bool(cfg.data.train), "data.train", cfg.data.train, "a shard dir / glob / URL or an ImageFolder dir")
    need(cfg.model.weights is not None or cfg.model.name is not None, "model.name", cfg.model.name,
         "a timm model name when model.weights is null (random init)")
    need(cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "an int >= 1")
    if cfg.mixup.active:  # timm's batch-mode Mixup flips the batch and pairs sample i with B-1-i
        need(cfg.data.batch_size % 2 == 0, "data.batch_size", cfg.data.batch_size, "an even number with mixup/cutmix")
    need(cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, "an int >= 0")
    need(0 < cfg.data.eval_crop_pct <= 1, "data.eval_crop_pct", cfg.data.eval_crop_pct, "a fraction in (0, 1]")
    need(cfg.model.num_classes is None or cfg.model.num_classes >= 1, "model.num_classes", cfg.model.num_classes,
         "null or an int >= 1")
    need(0 <= cfg.model.drop_path_rate < 1, "model.drop_path_rate", cfg.model.drop_path_rate, "a rate in [0, 1)")
    need(len(cfg.augment.scale) == 2 and 0 < cfg.augment.scale[0] <= cfg.augment.scale[1] <= 1,
         "augment.scale", cfg.augment.scale, "[min, max] with 0 < min <= max <= 1")
    need(cfg.optim.lr is None or cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "null or > 0")
    need(cfg.optim.base_lr > 0, "optim.base_lr", cfg.optim.base_lr, "> 0")
    need(cfg.optim.layer_decay is None or 0 < cfg.optim.layer_decay <= 1, "optim.layer_decay",
         cfg.optim.layer_decay, "null or in (0, 1]")
    need(len(cfg.optim.betas) == 2, "optim.betas", cfg.optim.betas, "two floats")
    need(cfg.schedule.train_epochs >= 1, "schedule.train_epochs", cfg.schedule.train_epochs, "an int >= 1")
    need(0 <= cfg.schedule.warmup_epochs < cfg.schedule.train_epochs, "schedule.warmup_epochs",
         cfg.schedule.warmup_epochs, f"an int in [0, schedule.train_epochs={cfg.schedule.train_epochs})")
    need(0 < cfg.ema.decay < 1, "ema.decay", cfg.ema.decay, "in (0, 1)")
    need(cfg.train.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", cfg.train.checkpoint_every_steps,
         "an int >= 1")
    need(cfg.train.keep_last >= 1, "train.keep_last", cfg.train.keep_last, "an int >= 1")
    need(cfg.train.eval_every_epochs >= 1, "train.eval_every_epochs", cfg.train.eval_every_epochs, "an int >= 1")
    need(cfg.train.log_every_steps >= 1, "train.log_every_steps", cfg.train.log_every_steps, "an int >= 1")


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """Defaults <- recipe YAML at ``path`` <- ``key.sub=value`` overrides, validated."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for item in overrides or []:
        keys, value = parse_override(item)
        node: dict[str, Any] = {}
        leaf = node
        for k in keys[:-1]:
            leaf = leaf.setdefault(k, {})
        leaf[keys[-1]] = value
        data = _merge(data, node)
    cfg = _build(FinetuneConfig, data)
    _validate(cfg)
    return cfg
