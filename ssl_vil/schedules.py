"""Training schedules as pure functions of the optimizer step, and the optimizer param groups they act on.

Nothing here keeps state: the learning rate, weight decay, EMA momentum and teacher temperature at step s
are closed-form functions of s and a :class:`ScheduleConfig`, so resuming needs only the step. The trainer
calls :func:`apply_schedules` before every optimizer step; it writes ``lr`` and ``weight_decay`` into each
param group from the group's ``lr_scale`` / ``wd_scale`` / ``is_last_layer`` set by :func:`build_param_groups`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from timm.models import group_parameters
from torch import nn

from ssl_vil.heads import LAST_LAYER_NAME


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """Schedule settings; every duration is in optimizer steps.

    lr: linear warmup ``warmup_start_lr -> base_lr`` over ``warmup_steps``, then cosine to ``final_lr`` at
    ``total_steps``. Weight decay and EMA momentum: cosine from start to end over ``total_steps``. Teacher
    temperature: linear ``teacher_temp_start -> teacher_temp_end`` over ``teacher_temp_warmup_steps``, then
    constant. The prototype (last) layer has lr 0 for the first ``freeze_last_layer_steps`` steps.
    """

    total_steps: int
    base_lr: float
    final_lr: float = 1e-6
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    weight_decay_start: float = 0.04
    weight_decay_end: float = 0.4
    momentum_start: float = 0.996
    momentum_end: float = 1.0
    teacher_temp_start: float = 0.04
    teacher_temp_end: float = 0.07
    teacher_temp_warmup_steps: int = 0
    freeze_last_layer_steps: int = 0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"ScheduleConfig.total_steps must be >= 1, got {self.total_steps}")
        for name in ("warmup_steps", "teacher_temp_warmup_steps", "freeze_last_layer_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"ScheduleConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"ScheduleConfig.warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps})"
            )


def warmup_cosine(
    step: int,
    *,
    total_steps: int,
    peak_value: float,
    final_value: float,
    warmup_steps: int = 0,
    warmup_start_value: float = 0.0,
) -> float:
    """Linear warmup from ``warmup_start_value`` (step 0) to ``peak_value`` (step ``warmup_steps``), then
    half a cosine from ``peak_value`` to ``final_value`` (reached at ``total_steps``; constant after)."""
    if step < warmup_steps:
        return warmup_start_value + (peak_value - warmup_start_value) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_value + 0.5 * (peak_value - final_value) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: ScheduleConfig) -> float:
    return warmup_cosine(
        step,
        total_steps=cfg.total_steps,
        peak_value=cfg.base_lr,
        final_value=cfg.final_lr,
        warmup_steps=cfg.warmup_steps,
        warmup_start_value=cfg.warmup_start_lr,
    )


def weight_decay_at(step: int, cfg: ScheduleConfig) -> float:
    return warmup_cosine(
        step, total_steps=cfg.total_steps, peak_value=cfg.weight_decay_start, final_value=cfg.weight_decay_end
    )


def ema_momentum_at(step: int, cfg: ScheduleConfig) -> float:
    return warmup_cosine(
        step, total_steps=cfg.total_steps, peak_value=cfg.momentum_start, final_value=cfg.momentum_end
    )


def teacher_temp_at(step: int, cfg: ScheduleConfig) -> float:
    if step >= cfg.teacher_temp_warmup_steps:
        return cfg.teacher_temp_end
    fraction = step / cfg.teacher_temp_warmup_steps
    return cfg.teacher_temp_start + (cfg.teacher_temp_end - cfg.teacher_temp_start) * fraction


def last_layer_lr_multiplier(step: int, freeze_steps: int) -> float:
    """0 while the prototype layer is frozen (steps 0 .. freeze_steps - 1), 1 afterwards."""
    return 0.0 if step < freeze_steps else 1.0


def scale_lr(base_lr: float, batch_size: int, *, reference_batch_size: int, rule: str = "linear") -> float:
    """Batch-size scaling: ``linear`` (DINO: lr·B/256) or ``sqrt`` (DINOv2: lr·sqrt(B/1024))."""
    if batch_size < 1 or reference_batch_size < 1:
        raise ValueError(f"batch sizes must be positive, got {batch_size} and {reference_batch_size}")
    ratio = batch_size / reference_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    raise ValueError(f"lr scaling rule must be 'linear' or 'sqrt', got {rule!r}")


def drop_path_rates(depth: int, rate: float, mode: str = "uniform") -> list[float]:
    """Per-block drop-path rates: ``uniform`` (every block ``rate``) or ``linear`` (0 -> ``rate``)."""
    if mode == "uniform":
        return [rate] * depth
    if mode == "linear":
        return [rate * i / (depth - 1) if depth > 1 else rate for i in range(depth)]
    raise ValueError(f"drop-path mode must be 'uniform' or 'linear', got {mode!r}")


def layer_decay_scales(backbone: nn.Module, layer_decay: float) -> dict[str, float]:
    """lr scale per backbone parameter name: ``layer_decay ** (n_groups - layer_id)``.

    Layer ids come from the backbone's timm ``group_matcher(coarse=True)``: for ViL the stem (patch/pos
    embed, mask token) is 0 and block pair i is i + 1 (the final norm joins the last pair). ``n_groups`` is
    one more than the highest id of a *trainable* parameter, so with the classifier path frozen (SSL)
    n_groups = depth + 1: the heads sit one level above the backbone with scale 1, the last block pair gets
    ``layer_decay`` and the stem ``layer_decay ** (depth + 1)`` -- the DINOv2 assignment. Frozen parameters
    above that (a pre-head norm) get scales > 1, which is harmless since they are not optimised.
    """
    names = [n for n, _ in backbone.named_parameters()]
    if layer_decay == 1.0:
        return {n: 1.0 for n in names}
    if not hasattr(backbone, "group_matcher"):
        raise ValueError(
            f"layer-wise lr decay needs a backbone with group_matcher(); {type(backbone).__name__} has none"
        )
    layer_of = group_parameters(backbone, backbone.group_matcher(coarse=True), reverse=True)
    trainable = [layer_of[n] for n, p in backbone.named_parameters() if p.requires_grad]
    n_groups = max(trainable if trainable else layer_of.values()) + 1
    return {n: layer_decay ** (n_groups - layer_of[n]) for n in names}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def build_param_groups(
    student: nn.Module,
    *,
    backbone_attr: str = "backbone",
    layer_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    no_weight_decay: Iterable[str] = (),
    last_layer_name: str = LAST_LAYER_NAME,
) -> list[dict[str, Any]]:
    """Optimizer param groups of the trainable student parameters.

    Weight decay is off for 1-D tensors (biases, norm weights, layer scales), names ending in ``.bias``, the
    backbone's ``no_weight_decay()`` names (e.g. ``pos_embed``, ``mask_token``) and ``no_weight_decay``
    patterns (full names, prefixes or globs). Backbone parameters get the layer-decay scale; names containing
    ``patch_embed`` are additionally multiplied by ``patch_embed_lr_mult``; head parameters have scale 1.
    Parameters whose name contains ``last_layer_name`` form ``is_last_layer`` groups.

    Each group: ``{"params", "param_names", "lr_scale", "wd_scale", "apply_wd", "is_last_layer"}``;
    parameters with equal (lr_scale, apply_wd, is_last_layer) share a group.
    """
    backbone = getattr(student, backbone_attr, None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"student has no backbone module at attribute {backbone_attr!r}")
    prefix = backbone_attr + "."
    backbone_no_wd = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    layer_scale = layer_decay_scales(backbone, layer_decay)
    extra_no_wd = tuple(no_weight_decay)

    groups: dict[tuple[float, bool, bool], dict[str, Any]] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        lr_scale = 1.0
        apply_wd = param.ndim > 1 and not name.endswith(".bias") and not _matches(name, extra_no_wd)
        if name.startswith(prefix):
            local = name[len(prefix) :]
            lr_scale = layer_scale[local]
            if "patch_embed" in local:
                lr_scale *= patch_embed_lr_mult
            if _matches(local, backbone_no_wd):
                apply_wd = False
        is_last = last_layer_name in name
        key = (lr_scale, apply_wd, is_last)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr_scale": lr_scale,
                "wd_scale": 1.0 if apply_wd else 0.0,
                "apply_wd": apply_wd,
                "is_last_layer": is_last,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, step: int, cfg: ScheduleConfig) -> dict[str, float]:
    """Set every group's ``lr`` and ``weight_decay`` for ``step``; returns the scheduled scalar values.

    group lr = lr_at(step) · lr_scale · (0 for last-layer groups while frozen);
    group weight_decay = weight_decay_at(step) · wd_scale.
    """
    lr = lr_at(step, cfg)
    wd = weight_decay_at(step, cfg)
    last_mult = last_layer_lr_multiplier(step, cfg.freeze_last_layer_steps)
    for group in optimizer.param_groups:
        multiplier = last_mult if group.get("is_last_layer", False) else 1.0
        group["lr"] = lr * group.get("lr_scale", 1.0) * multiplier
        group["weight_decay"] = wd * group.get("wd_scale", 1.0)
    return {
        "lr": lr,
        "weight_decay": wd,
        "ema_momentum": ema_momentum_at(step, cfg),
        "teacher_temp": teacher_temp_at(step, cfg),
        "last_layer_lr_mult": last_mult,
    }
