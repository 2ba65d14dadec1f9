"""Build the run's components from a resolved :class:`RunConfig` (no training logic, no translation: every
component takes its own section of the config)."""

from __future__ import annotations

import timm
import torch
from torch import nn

from ssl_vil.config import RunConfig
from ssl_vil.export import backbone_kwargs, is_vit_run
from ssl_vil.objectives import SelfDistillationObjective, build_objective
from ssl_vil.schedules import build_param_groups


def build_backbone(cfg: RunConfig) -> nn.Module:
    """The student backbone; it has a learned mask token iff the objective has a masked-patch loss.

    ViL models are built by timm directly; a timm VisionTransformer is wrapped in
    :class:`~ssl_vil.backbones.vit_adapter.MaskedViT` (DINOv2's [CLS]/patch split and mask token)."""
    if is_vit_run(cfg):
        from ssl_vil.backbones.vit_adapter import create_vit_backbone

        return create_vit_backbone(cfg.model.name, mask_token=cfg.objective.uses_ibot,
                                   drop_path_rate=cfg.model.drop_path_rate, **backbone_kwargs(cfg))
    return timm.create_model(cfg.model.name, pretrained=False, num_classes=0, drop_path_rate=cfg.model.drop_path_rate,
                             mask_token=cfg.objective.uses_ibot, **backbone_kwargs(cfg))


def build_ssl_objective(cfg: RunConfig) -> SelfDistillationObjective:
    backbone = build_backbone(cfg)
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return build_objective(backbone, cfg.objective)


def build_optimizer(cfg: RunConfig, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW over per-group lr/wd scales; the schedules set each group's lr and weight decay every step."""
    groups = build_param_groups(student, layer_decay=cfg.optim.layer_decay,
                                patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult)
    return torch.optim.AdamW(groups, lr=cfg.derived.peak_lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                             weight_decay=0.0)
