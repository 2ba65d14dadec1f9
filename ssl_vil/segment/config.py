"""Segmentation recipe schema: plain YAML (``recipes/segment_*.yaml``) + ``key.sub=value`` overrides.

Built by the engine every recipe uses (:mod:`ssl_vil.config.engine`): unknown keys (with a did-you-mean) and wrong
types are refused naming the dotted key before anything is built. The optimizer section is the classification
fine-tune's (:class:`ssl_vil.eval.finetune_config.FtOptim`: timm optimizer, layer-wise lr decay), the step guard
is the pretraining trainer's. Durations are optimizer steps (``*_steps``), as segmentation schedules are quoted
(ADE20K: 160k iterations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ssl_vil.config import engine
from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid
from ssl_vil.eval.finetune_config import FtOptim
from ssl_vil.train.config import StepGuardConfig

IGNORE_INDEX = 255


@dataclass(kw_only=True, slots=True)
class SegModel(Config):
    weights: str | None = None  # run dir | checkpoint folder | exported .safetensors | weights file; None: random init
    name: str | None = None  # timm name; needed without model.json (random init or bare weights file)
    # timm constructor kwargs: the architecture for random init / a bare weights file; with pretrained weights,
    # overrides of the pretraining architecture that its weights still fit (e.g. stride: 8).
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.1
    # ViL's mLSTM form here, whatever the pretraining used: dense inputs are long sequences, and auto picks the
    # linear-time chunkwise form above 256 tokens. null: keep the backbone's own setting.
    mlstm_backend: str | None = "auto"
    # Backbone blocks whose outputs feed the decoder (timm forward_intermediates indices; negative counts from
    # the end). The linear decoder uses the last one.
    feature_indices: list[int] = field(default_factory=lambda: [-4, -3, -2, -1])
    # The backbone's final per-token norm on every map (as DINOv2's dense probes); the official ViL UperNet
    # recipe takes the raw block outputs (false).
    feature_norm: bool = True
    decoder: Literal["linear", "fpn"] = "fpn"
    decoder_dim: int = 256  # channels of the FPN levels (UperNet on ViL uses 512 at ViL-S size)
    num_classes: int | None = None  # None: the data's class list (manifest / classes.txt)


@dataclass(kw_only=True, slots=True)
class SegData(Config):
    train: str = ""  # seg shard dir (make_shards --masks) | folder with images/ + masks/ | builtin:digits-seg
    val: str | None = None
    train_split: str | None = None  # default "train" when the shard dir holds several splits
    val_split: str | None = None  # default "val"
    crop_size: int = 512  # square training crop (px), padded with the ignore index where the image is smaller
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random rescale of the image before the crop
    base_size: int | None = None  # short side the scale range is relative to; None: the image's own size
    hflip: float = 0.5
    mean: list[float] | None = None  # None: the backbone's pretraining normalisation
    std: list[float] | None = None
    ignore_index: int = IGNORE_INDEX  # mask value excluded from the loss and the metrics
    batch_size: int = 16  # per process
    num_workers: int = 4
    eval_mode: Literal["whole", "slide"] = "whole"  # whole image, or crop_size windows at eval_stride
    eval_stride: int | None = None  # sliding-window stride (px); None: crop_size * 2 // 3


@dataclass(kw_only=True, slots=True)
class SegSchedule(Config):
    train_steps: int = 160_000
    warmup_steps: int = 1_500
    min_lr: float = 0.0
    warmup_lr: float = 1e-6


@dataclass(kw_only=True, slots=True)
class SegTrain(Config):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    checkpoint_every_steps: int = 2_000
    keep_last: int = 2
    eval_every_steps: int = 16_000  # and after the last step
    log_every_steps: int = 50
    tensorboard: bool = True  # RUN/tb: loss, lr, grad norm, throughput per step; the evaluations


@dataclass(kw_only=True, slots=True)
class SegmentConfig(Config):
    model: SegModel = field(default_factory=SegModel)
    data: SegData = field(default_factory=SegData)
    optim: FtOptim = field(default_factory=lambda: FtOptim(base_lr=6e-5 * 256 / 16, layer_decay=0.9))
    schedule: SegSchedule = field(default_factory=SegSchedule)
    train: SegTrain = field(default_factory=SegTrain)
    # The pretraining trainer's step guard: non-finite losses / gradients skip the step (or halt), spikes skip it.
    guards: StepGuardConfig = field(default_factory=StepGuardConfig)

    def to_dict(self) -> dict[str, Any]:
        return engine.to_dict(self)

    def validate(self) -> None:
        """Checks of the whole recipe (the data location is required, so a bare ``SegmentConfig()`` fails)."""
        _validate(self)


def _validate(cfg: SegmentConfig) -> None:
    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise invalid(key, value, expected)

    m, d, s, t = cfg.model, cfg.data, cfg.schedule, cfg.train
    need(bool(d.train), "data.train", d.train, "a seg shard dir, a folder with images/ and masks/, or "
         "builtin:digits-seg")
    need(m.weights is not None or m.name is not None, "model.name", m.name,
         "a timm model name when model.weights is null (random init)")
    from ssl_vil.backbones.mlstm_cell import MLSTM_BACKENDS

    need(m.mlstm_backend is None or m.mlstm_backend in MLSTM_BACKENDS, "model.mlstm_backend", m.mlstm_backend,
         f"null or one of {', '.join(MLSTM_BACKENDS)}")
    need(len(m.feature_indices) >= 1, "model.feature_indices", m.feature_indices, "at least one block index")
    need(m.decoder_dim >= 1, "model.decoder_dim", m.decoder_dim, "an int >= 1")
    need(m.num_classes is None or m.num_classes >= 2, "model.num_classes", m.num_classes, "null or an int >= 2")
    need(0 <= m.drop_path_rate < 1, "model.drop_path_rate", m.drop_path_rate, "a rate in [0, 1)")
    need(d.crop_size >= 1, "data.crop_size", d.crop_size, "an int >= 1 (px)")
    need(len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1], "data.scale_range", d.scale_range,
         "[min, max] with 0 < min <= max")
    need(d.base_size is None or d.base_size >= 1, "data.base_size", d.base_size, "null or an int >= 1 (px)")
    need(0 <= d.hflip <= 1, "data.hflip", d.hflip, "a probability in [0, 1]")
    need(0 <= d.ignore_index <= 255, "data.ignore_index", d.ignore_index, "a mask value in 0..255")
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, "an int >= 1")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "an int >= 0")
    need(d.eval_stride is None or 1 <= d.eval_stride <= d.crop_size, "data.eval_stride", d.eval_stride,
         f"null or an int in [1, data.crop_size={d.crop_size}]")
    for key in ("mean", "std"):
        value = getattr(d, key)
        need(value is None or len(value) == 3, f"data.{key}", value, "null or three floats (RGB)")
    need(cfg.optim.lr is None or cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "null or > 0")
    need(cfg.optim.base_lr > 0, "optim.base_lr", cfg.optim.base_lr, "> 0")
    need(cfg.optim.layer_decay is None or 0 < cfg.optim.layer_decay <= 1, "optim.layer_decay",
         cfg.optim.layer_decay, "null or in (0, 1]")
    need(len(cfg.optim.betas) == 2, "optim.betas", cfg.optim.betas, "two floats")
    need(s.train_steps >= 1, "schedule.train_steps", s.train_steps, "an int >= 1")
    need(0 <= s.warmup_steps < s.train_steps, "schedule.warmup_steps", s.warmup_steps,
         f"an int in [0, schedule.train_steps={s.train_steps})")
    for key in ("checkpoint_every_steps", "keep_last", "eval_every_steps", "log_every_steps"):
        need(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "an int >= 1")


def load_segment_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SegmentConfig:
    """Defaults <- recipe YAML at ``path`` <- ``key.sub=value`` overrides, validated."""
    return engine.load(SegmentConfig, path, overrides or [])
