"""Typed schema of a pretraining run: the components' own config classes, composed.

A run config is ``defaults <- recipe YAML <- CLI key.sub=value overrides`` (:mod:`ssl_vil.config.engine`). Each
section is the config class of the component that reads it:

    model        ModelConfig (here; the timm constructor arguments of the backbone)
    objective    ssl_vil.objectives.self_distillation.ObjectiveConfig (heads: ssl_vil.heads.DINOHeadConfig)
    masking      ssl_vil.objectives.masking.MaskingConfig
    data         DataConfig (here; the shard stream), data.augment: ssl_vil.augment.presets.AugmentConfig
    optim        OptimConfig (here; AdamW and the values its schedules move between)
    schedule     ssl_vil.schedules.ScheduleConfig
    checkpoint   ssl_vil.checkpoint.config.CheckpointConfig
    guards       ssl_vil.train.config.GuardConfig
    knn_monitor  ssl_vil.train.config.KnnMonitorConfig
    logging, dist, train   here (the trainer's process settings)
    derived      DerivedConfig: resolved once by the loader (never set by hand)

Every field has a type the engine checks; unknown keys are rejected with a did-you-mean; each class checks its own
fields and :meth:`RunConfig.validate` the few checks across sections. Durations carry their unit in the name and
exactly one unit per duration is set (``total_steps`` | ``total_samples`` | ``total_epochs``); the loader converts
them once to steps and records the result in :class:`DerivedConfig`, which is what the trainer reads.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal

from ssl_vil.augment.presets import AugmentConfig
from ssl_vil.backbones.designs import BLOCK_DESIGNS, DEFAULT_BLOCK_DESIGN
from ssl_vil.backbones.pooling import pooled_dim
from ssl_vil.checkpoint.config import CheckpointConfig
from ssl_vil.config.engine import Config
from ssl_vil.config.errors import ConfigError, invalid
from ssl_vil.objectives.masking import MaskingConfig
from ssl_vil.objectives.self_distillation import ObjectiveConfig
from ssl_vil.schedules import ScheduleConfig
from ssl_vil.train.config import GuardConfig, KnnMonitorConfig


@dataclass(kw_only=True, slots=True)
class ModelConfig(Config):
    """The backbone: a registered ViL model or any timm VisionTransformer (``vit_small_patch16_224``, ...), plus
    constructor overrides. For a ViT, ``dim`` is its ``embed_dim`` (heads of the registered model's width),
    ``depth`` its number of blocks; ``mlstm_backend`` and ``block_design`` apply to ViL only."""

    name: str = "vil2_small_patch16_224"
    patch_size: int = 16
    dim: int | None = None  # None: the registered model's width
    depth: int | None = None  # None: the registered model's depth (v2: block pairs, v1: blocks)
    drop_path_rate: float = 0.0
    # "mlstm_kernels" needs the optional extra ssl_vil[kernels] (NXAI Community Licence); checked when it runs.
    mlstm_backend: Literal["auto", "parallel", "chunkwise", "mlstm_kernels"] = "auto"
    grad_checkpointing: bool = False
    # The traversal design of every v2 sub-block (ssl_vil.backbones.designs); "alternating" is the official ViL.
    block_design: str = DEFAULT_BLOCK_DESIGN

    def validate(self) -> None:
        from ssl_vil.backbones import MODEL_NAMES

        # The package's own models need no timm import (a config check stays fast); others are looked up in timm.
        if self.name not in MODEL_NAMES and self.name not in (models := _known_models()) and not _is_vit(self.name):
            near = difflib.get_close_matches(self.name, models + _vit_names(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"got {self.name!r}, expected a registered ViL model ({', '.join(models)}) or a timm "
                              f"VisionTransformer (e.g. vit_small_patch16_224){hint}", key="name")
        if self.patch_size <= 0:
            raise invalid("patch_size", self.patch_size, "a positive integer")
        for name in ("dim", "depth"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise invalid(name, value, "a positive integer or null")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise invalid("drop_path_rate", self.drop_path_rate, "a value in [0, 1)")
        if self.dim is not None and self.name not in MODEL_NAMES:
            from ssl_vil.backbones.vit_adapter import vit_facts

            facts = vit_facts(self.name)
            head_width = facts["embed_dim"] // facts["num_heads"] if facts else 0
            if head_width and self.dim % head_width:
                raise invalid("dim", self.dim, f"a multiple of {head_width}, the attention head width of "
                              f"{self.name} (the ViT keeps it: num_heads = dim // {head_width})")
        if self.block_design not in BLOCK_DESIGNS:
            near = difflib.get_close_matches(self.block_design, BLOCK_DESIGNS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise invalid("block_design", self.block_design, "one of " + ", ".join(BLOCK_DESIGNS) + hint)
        if self.block_design != DEFAULT_BLOCK_DESIGN and not self.name.startswith("vil2_"):
            raise invalid("block_design", self.block_design,
                          f"{DEFAULT_BLOCK_DESIGN!r}: block designs exist for the v2 ViL models (vil2_*) only, "
                          f"not {self.name}")


@dataclass(kw_only=True, slots=True)
class DataConfig(Config):
    """Pretraining input: WebDataset shards (local or remote) or an image folder."""

    # shard directory, glob, brace list or file list, a remote shard directory or brace list (http(s)://...),
    # or an image folder (class sub-directories, or a flat folder of images)
    train: str = ""
    split: str | None = None  # manifest split of a shard directory; None: "train" if it has one, else its only one
    # sizes.json / _info.json / manifest (path or URL) with the record counts of shards that have no sidecar
    # beside them (pipe: URLs)
    shard_sizes: str | None = None
    mode: Literal["epoch", "resampled"] = "epoch"
    samples_per_epoch: int | None = None  # None: read from the shard manifest
    num_workers: int = 8
    shuffle_window_samples: int = 64  # raw-record shuffle window per batch slot (memory ~ batch × window)
    error_budget_fraction: float = 0.01
    max_image_pixels: int = 89_478_485  # PIL's decompression-bomb threshold
    allow_pipe: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        if self.samples_per_epoch is not None and self.samples_per_epoch <= 0:
            raise invalid("samples_per_epoch", self.samples_per_epoch, "a positive integer or null")
        if self.num_workers < 0:
            raise invalid("num_workers", self.num_workers, "a non-negative integer")
        if self.shuffle_window_samples <= 0:
            raise invalid("shuffle_window_samples", self.shuffle_window_samples, "a positive integer")
        if not 0.0 <= self.error_budget_fraction <= 1.0:
            raise invalid("error_budget_fraction", self.error_budget_fraction, "a fraction in [0, 1]")
        if self.max_image_pixels <= 0:
            raise invalid("max_image_pixels", self.max_image_pixels, "a positive integer")
        if self.split is not None and (not self.split or "/" in self.split):
            raise invalid("split", self.split, "a split name (manifest-<split>.json) or null")
        if self.train.startswith("pipe:") and not self.allow_pipe:
            raise invalid("train", self.train, "a path or URL; pipe: URLs run shell commands and need "
                          "data.allow_pipe=true")


@dataclass(kw_only=True, slots=True)
class OptimConfig(Config):
    """AdamW with per-group lr/wd driven by pure schedules (``ssl_vil.schedules``)."""

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

    def validate(self) -> None:
        for name in ("global_batch_size", "grad_accum_steps", "lr_reference_batch_size"):
            if getattr(self, name) <= 0:
                raise invalid(name, getattr(self, name), "a positive integer")
        if self.lr <= 0:
            raise invalid("lr", self.lr, "a positive learning rate")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise invalid("min_lr", self.min_lr, f"a value in [0, optim.lr={self.lr}]")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise invalid("clip_grad_norm", self.clip_grad_norm, "a positive norm or null")
        if not 0.0 < self.layer_decay <= 1.0:
            raise invalid("layer_decay", self.layer_decay, "a value in (0, 1]")
        if not 0.0 <= self.momentum_start <= self.momentum_end <= 1.0:
            raise invalid("momentum_start", self.momentum_start,
                          f"0 <= momentum_start <= optim.momentum_end={self.momentum_end} <= 1")


@dataclass(kw_only=True, slots=True)
class LoggingConfig(Config):
    log_every_steps: int = 20
    tensorboard: bool = True

    def validate(self) -> None:
        if self.log_every_steps <= 0:
            raise invalid("log_every_steps", self.log_every_steps, "a positive integer")


@dataclass(kw_only=True, slots=True)
class DistConfig(Config):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 1800.0

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise invalid("timeout_s", self.timeout_s, "a positive number of seconds")


@dataclass(kw_only=True, slots=True)
class TrainConfig(Config):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on GPU, fp32 on CPU; fp16 always runs with a checkpointed dynamic loss scaler
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    deterministic: bool = True
    # How the student is spread over more than one process: "ddp" replicates it (DistributedDataParallel);
    # "fsdp2" shards student and teacher per block (torch.distributed.fsdp.fully_shard), checkpoints stay full
    # (rank-agnostic). One process trains the plain student either way. See ssl_vil.train.fsdp.
    distributed: Literal["ddp", "fsdp2"] = "ddp"

    def validate(self) -> None:
        if self.distributed == "fsdp2" and self.precision == "fp16":
            raise invalid("distributed", self.distributed,
                          "'ddp' with train.precision=fp16: the fp16 loss scaler checks overflow per gradient "
                          "shard under fsdp2, so ranks could disagree on the loss scale (use precision bf16)")


@dataclass(kw_only=True, slots=True)
class DerivedConfig(Config):
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


@dataclass(kw_only=True, slots=True)
class RunConfig(Config):
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    knn_monitor: KnnMonitorConfig = field(default_factory=KnnMonitorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    derived: DerivedConfig = field(default_factory=DerivedConfig)

    def validate(self) -> None:
        """The checks that span sections (each section has checked its own fields)."""
        m, a, o = self.model, self.data.augment, self.objective
        # Filled here, on the whole tree, not in AugmentConfig itself: the engine merges a section's default
        # instance under the stated values, and a resolved default would pass for stated values.
        try:
            a.resolve_preset(patch_size=m.patch_size)
        except ConfigError as err:
            raise err.within("data.augment") from None
        sizes = [("data.augment.global_size", a.global_size)]
        if a.n_local > 0:
            sizes.append(("data.augment.local_size", a.local_size))
        for key, size in sizes:
            if size % m.patch_size:
                raise invalid(key, size, f"a multiple of model.patch_size={m.patch_size}")
        _resolve_pooling(m, o)
        if o.uses_ibot and o.shared_head:
            dim = _model_width(m)
            if pooled_dim(dim, o.pooling) != dim:
                raise ConfigError(f"got True, but the DINO head sees {o.pooling!r} features of width "
                                  f"{pooled_dim(dim, o.pooling)} and the iBOT head patch tokens of width {dim}; "
                                  f"expected shared_head=false or objective.pooling='bilateral_avg'/'avg'",
                                  key="objective.shared_head")


def _known_models() -> list[str]:
    import timm

    import ssl_vil.backbones  # noqa: F401  (registers the ViL family)

    return sorted(set(timm.list_models("vil*")))


def _is_vit(name: str) -> bool:
    from ssl_vil.backbones.vit_adapter import is_vit_model

    return is_vit_model(name)


def _vit_names() -> list[str]:
    import timm

    return sorted(timm.list_models("vit_*"))


def _resolve_pooling(m: ModelConfig, o: ObjectiveConfig) -> None:
    """State ``objective.pooling`` (auto: the backbone's default) and check it applies to the backbone: ViL
    poolings on a ViL (``middle_cls`` adds its middle token), ``cls`` / ``avg`` on a ViT."""
    from ssl_vil.backbones import MODEL_NAMES
    from ssl_vil.backbones.pooling import allowed_poolings

    if m.name in MODEL_NAMES:
        allowed, family = allowed_poolings(is_vit=False), "a ViL backbone"
    else:
        from ssl_vil.backbones.vit_adapter import vit_facts

        facts = vit_facts(m.name) or {}
        allowed = allowed_poolings(is_vit=True, has_class_token=facts.get("has_class_token", True))
        family = f"the ViT {m.name}"
    if o.pooling == "auto":
        o.pooling = allowed[0]
    elif o.pooling not in allowed:
        raise ConfigError(f"got {o.pooling!r}, which does not apply to {family}; expected one of "
                          f"{', '.join(allowed)}", key="objective.pooling")
    design = getattr(m, "block_design", "alternating")
    if o.pooling == "middle_cls" and design.startswith("quad"):
        raise ConfigError(f"got 'middle_cls', but the middle token has no place in the column traversals of "
                          f"model.block_design={design!r}; expected another pooling or a row-wise design "
                          f"(alternating, uni, bi, bi_shared)", key="objective.pooling")


def _model_width(m: ModelConfig) -> int:
    """Token width of the configured backbone (built on the meta device: no allocation, no init)."""
    if m.dim is not None:
        return m.dim
    import timm
    import torch

    with torch.device("meta"):
        return int(timm.create_model(m.name, pretrained=False, num_classes=0).embed_dim)
