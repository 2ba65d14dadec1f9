"""Build the run's components from a resolved :class:`RunConfig` (no training logic here)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from ssl_vil.config import RunConfig
from ssl_vil.export import backbone_kwargs
from ssl_vil.heads import DINOHeadConfig
from ssl_vil.objectives import ObjectiveConfig, SelfDistillationObjective, build_objective
from ssl_vil.schedules import ScheduleConfig, build_param_groups


def build_backbone(cfg: RunConfig) -> nn.Module:
    """The student backbone; iBOT-style objectives get a learned mask token."""
    uses_ibot = cfg.objective.name in ("ibot", "dinov2")
    return timm.create_model(cfg.model.name, pretrained=False, num_classes=0, drop_path_rate=cfg.model.drop_path_rate,
                             mask_token=uses_ibot, **backbone_kwargs(cfg))


def _head(h: Any) -> DINOHeadConfig:
    return DINOHeadConfig(out_dim=h.out_dim, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim,
                          n_layers=h.nlayers, batch_norm=h.batchnorm, norm_last_layer=h.norm_last_layer)


def objective_config(cfg: RunConfig) -> ObjectiveConfig:
    o = cfg.objective
    uses_ibot = o.name in ("ibot", "dinov2")
    return ObjectiveConfig(
        pooling=o.pooling, dino_head=_head(o.dino_head), ibot_head=_head(o.ibot_head), shared_head=o.shared_head,
        centering="sinkhorn_knopp" if o.centering == "sinkhorn" else "ema", center_momentum=o.center_momentum,
        student_temp=o.student_temp, dino_weight=o.dino_weight, ibot_weight=o.ibot_weight if uses_ibot else 0.0,
        koleo_weight=o.koleo_weight if o.name == "dinov2" else 0.0)


def build_ssl_objective(cfg: RunConfig) -> SelfDistillationObjective:
    backbone = build_backbone(cfg)
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return build_objective(cfg.objective.name, backbone, objective_config(cfg))


def schedule_config(cfg: RunConfig) -> ScheduleConfig:
    d, opt, o = cfg.derived, cfg.optim, cfg.objective
    return ScheduleConfig(
        total_steps=d.total_steps, base_lr=d.peak_lr, final_lr=opt.min_lr, warmup_steps=d.warmup_steps,
        weight_decay_start=opt.weight_decay, weight_decay_end=opt.weight_decay_end,
        momentum_start=opt.momentum_start, momentum_end=opt.momentum_end,
        teacher_temp_start=o.warmup_teacher_temp, teacher_temp_end=o.teacher_temp,
        teacher_temp_warmup_steps=d.teacher_temp_warmup_steps, freeze_last_layer_steps=d.freeze_last_layer_steps)


def build_optimizer(cfg: RunConfig, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW over per-group lr/wd scales; the schedules set each group's lr and weight decay every step."""
    groups = build_param_groups(student, layer_decay=cfg.optim.layer_decay,
                                patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult)
    return torch.optim.AdamW(groups, lr=cfg.derived.peak_lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                             weight_decay=0.0)
