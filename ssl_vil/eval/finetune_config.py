"""Fine-tuning recipe schema: plain YAML (``recipes/finetune_*.yaml``) + ``key.sub=value`` overrides.

Built by the same engine as the pretraining config (:mod:`ssl_vil.config.engine`): unknown keys and wrong types
raise :class:`ssl_vil.config.ConfigError` naming the dotted key, before anything is built. Durations are in epochs
of the training split (``*_epochs``) or optimizer steps (``*_steps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ssl_vil.config import engine
from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid
from ssl_vil.train.config import StepGuardConfig


@dataclass(kw_only=True, slots=True)
class FtModel(Config):
    weights: str | None = None  # run dir | checkpoint folder | exported .safetensors | weights file; None: random init
    name: str | None = None  # timm name; needed without model.json (random init or bare weights file)
    # timm constructor kwargs: the architecture for random init / a bare weights file; with pretrained weights,
    # overrides of the pretraining architecture that its weights still fit (e.g. stride: 8, long-sequence).
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.1
    num_classes: int | None = None  # None: number of classes of the training data


@dataclass(kw_only=True, slots=True)
class FtData(Config):
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
class FtAugment(Config):
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm spec: rand-..., 3a, original, None
    color_jitter: float | None = None  # applied by timm only without RandAugment (e.g. with "3a")
    re_prob: float = 0.25
    re_mode: Literal["pixel", "const", "rand"] = "pixel"
    re_count: int = 1
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


@dataclass(kw_only=True, slots=True)
class FtMixup(Config):
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(kw_only=True, slots=True)
class FtOptim(Config):
    opt: str = "adamw"  # any timm optimizer name
    base_lr: float = 5e-4  # lr = base_lr x global_batch / 256 (MAE / BEiT linear rule)
    lr: float | None = None  # absolute lr; overrides base_lr
    weight_decay: float = 0.05
    layer_decay: float | None = 0.65  # per ViL block pair; None or 1.0: off
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad_norm: float | None = None


@dataclass(kw_only=True, slots=True)
class FtSchedule(Config):
    train_epochs: int = 100
    warmup_epochs: int = 5
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6


@dataclass(kw_only=True, slots=True)
class FtEma(Config):
    enabled: bool = False
    decay: float = 0.9999


@dataclass(kw_only=True, slots=True)
class FtTrain(Config):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    checkpoint_every_steps: int = 1000  # plus one at every epoch end
    keep_last: int = 2
    eval_every_epochs: int = 1
    log_every_steps: int = 20
    tensorboard: bool = True  # RUN/tb: loss, lr, grad norm, throughput per step; the evaluations


@dataclass(kw_only=True, slots=True)
class FinetuneConfig(Config):
    model: FtModel = field(default_factory=FtModel)
    data: FtData = field(default_factory=FtData)
    augment: FtAugment = field(default_factory=FtAugment)
    mixup: FtMixup = field(default_factory=FtMixup)
    optim: FtOptim = field(default_factory=FtOptim)
    schedule: FtSchedule = field(default_factory=FtSchedule)
    ema: FtEma = field(default_factory=FtEma)
    train: FtTrain = field(default_factory=FtTrain)
    # The pretraining trainer's step guard: non-finite losses / gradients skip the step (or halt), spikes skip it.
    guards: StepGuardConfig = field(default_factory=StepGuardConfig)

    def to_dict(self) -> dict[str, Any]:
        return engine.to_dict(self)

    def validate(self) -> None:
        """Checks of the whole recipe (the data location is required, so a bare ``FinetuneConfig()`` fails)."""
        _validate(self)


def _validate(cfg: FinetuneConfig) -> None:
    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise invalid(key, value, expected)

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
    return engine.load(FinetuneConfig, path, overrides or [])
