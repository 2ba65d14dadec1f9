"""Typed schema of a pretraining run.

A run config is ``defaults <- recipe YAML <- CLI key.sub=value overrides``. Every field has a type the loader
checks; unknown keys are rejected with a did-you-mean. Durations carry their unit in the name and exactly one unit
per duration is set (``total_steps`` | ``total_samples`` | ``total_epochs``); the loader converts them once to steps
and records the result in :class:`DerivedConfig`, which is what the trainer reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Pooling = Literal["bilateral_concat", "bilateral_avg", "avg"]


@dataclass(kw_only=True)
class ModelConfig:
    """The ViL backbone: a registered timm model name plus constructor overrides."""

    name: str = "vil2_small_patch16_224"
    patch_size: int = 16
    dim: int | None = None  # None: the registered model's width
    depth: int | None = None  # None: the registered model's depth (v2: block pairs, v1: blocks)
    drop_path_rate: float = 0.0
    mlstm_backend: Literal["auto", "parallel", "chunkwise"] = "auto"
    grad_checkpointing: bool = False


@dataclass(kw_only=True)
class HeadConfig:
    """DINO-style projection head: MLP -> L2-normalised bottleneck -> weight-normed prototypes."""

    out_dim: int = 65536  # K prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    batchnorm: bool = False
    norm_last_layer: bool = True


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Self-distillation objective: DINO, iBOT or DINOv2 (= DINO + iBOT + KoLeo)."""

    name: Literal["dino", "ibot", "dinov2"] = "dinov2"
    pooling: Pooling = "bilateral_concat"  # the "[CLS]" the DINO head and KoLeo see
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)
    shared_head: bool = False
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: Literal["ema", "sinkhorn"] = "ema"
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    mask_probability: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    mask_mode: Literal["block", "random"] = "block"


@dataclass(kw_only=True)
class AugmentConfig:
    """Multi-crop views; sizes are in pixels of the network input."""

    preset: Literal["dino", "ibot", "dinov2", "digits"] = "dinov2"
    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    blur: Literal["dino", "dinov2"] = "dino"  # dino: p=1.0/0.1/0.5; dinov2: its released 0.0/0.9/0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(kw_only=True)
class DataConfig:
    """Sharded WebDataset input."""

    train: str = ""  # shard directory, brace URL or file list
    mode: Literal["epoch", "resampled"] = "epoch"
    samples_per_epoch: int | None = None  # None: read from the shard manifest
    num_workers: int = 8
    shuffle_window_samples: int = 64  # raw-record shuffle window per batch slot (memory ~ batch × window)
    error_budget_fraction: float = 0.01
    max_image_pixels: int = 89_478_485  # PIL's decompression-bomb threshold
    allow_pipe: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with per-group lr/wd driven by pure schedules."""

    name: Literal["adamw"] = "adamw"
    global_batch_size: int = 1024
    grad_accum_steps: int = 1
    lr: float = 5e-4  # at lr_reference_batch_size; scaled to the global batch by lr_scaling
    lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt"
    lr_reference_batch_size: int = 1024
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad_norm: float | None = 3.0  # global norm per submodule (backbone, heads); None = off
    layer_decay: float = 1.0  # per ViL block pair; 1.0 = off
    patch_embed_lr_mult: float = 1.0
    momentum_start: float = 0.992  # teacher EMA
    momentum_end: float = 1.0


@dataclass(kw_only=True)
class ScheduleConfig:
    """Run length and warmups; set exactly one unit per duration."""

    total_steps: int | None = None
    total_samples: int | None = None
    total_epochs: float | None = None
    warmup_steps: int | None = None
    warmup_samples: int | None = None
    warmup_epochs: float | None = None
    teacher_temp_warmup_steps: int | None = None
    teacher_temp_warmup_samples: int | None = None
    teacher_temp_warmup_epochs: float | None = None
    freeze_last_layer_steps: int | None = None
    freeze_last_layer_samples: int | None = None
    freeze_last_layer_epochs: float | None = None


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    keep_every_steps: int | None = None


@dataclass(kw_only=True)
class GuardConfig:
    nonfinite_policy: Literal["skip", "halt"] = "skip"
    max_consecutive_skips: int = 3
    spike_detection: bool = True
    spike_window_steps: int = 50
    spike_z_threshold: float = 6.0
    collapse_ratio: float = 0.95  # teacher entropy / ln K
    collapse_window_steps: int = 200
    watchdog_timeout_s: float = 1800.0


@dataclass(kw_only=True)
class LoggingConfig:
    log_every_steps: int = 20
    tensorboard: bool = True
    keys_log: bool = False  # RUN/keys/rank{r}.jsonl: the sample keys of every step (data-order audit)


@dataclass(kw_only=True)
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 1800.0


@dataclass(kw_only=True)
class EvalConfig:
    """Periodic k-NN monitor during training (off when knn_every_steps is 0)."""

    knn_every_steps: int = 0
    knn_train: str = ""
    knn_val: str = ""
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    knn_batch_size: int = 256


@dataclass(kw_only=True)
class TrainConfig:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on GPU, fp32 on CPU; fp16 always runs with a checkpointed dynamic loss scaler
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    deterministic: bool = True


@dataclass(kw_only=True)
class DerivedConfig:
    """Values the loader resolves once (never set by hand); recorded in the run's config.yaml."""

    world_size: int = 1
    per_rank_batch_size: int = 0
    micro_batch_size: int = 0
    peak_lr: float = 0.0
    samples_per_epoch: int | None = None
    total_steps: int = 0
    warmup_steps: int = 0
    teacher_temp_warmup_steps: int = 0
    freeze_last_layer_steps: int = 0


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    derived: DerivedConfig = field(default_factory=DerivedConfig)
