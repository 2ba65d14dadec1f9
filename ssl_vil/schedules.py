"""Training schedules as pure functions of the optimizer step, and the optimizer param groups they act on.

:class:`ScheduleConfig` is the run config's ``schedule:`` section: the run length and the warmups, each in one
unit (``*_steps`` | ``*_samples`` | ``*_epochs``). The loader converts them to optimizer steps once
(:meth:`ScheduleConfig.resolve_steps`) and records them in the run's ``derived`` section.

Nothing here keeps state: the learning rate, weight decay, EMA momentum and teacher temperature at step s are
closed-form functions of s and the resolved run config (steps from ``derived``, values from ``optim`` and
``objective``), so resuming needs only the step. The trainer calls :func:`apply_schedules` before every optimizer
step; it writes ``lr`` and ``weight_decay`` into each param group from the group's ``lr_scale`` / ``wd_scale`` /
``is_last_layer`` set by :func:`build_param_groups`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ssl_vil.config.engine import Config
from ssl_vil.config.errors import ConfigError, invalid
from ssl_vil.heads import LAST_LAYER_NAME

if TYPE_CHECKING:
    from ssl_vil.config.schema import RunConfig

DURATIONS = ("total", "warmup", "teacher_temp_warmup", "freeze_last_layer")
UNITS = ("steps", "samples", "epochs")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig(Config):
    """Run length and warmups; set exactly one unit per duration (none: a warmup of 0 steps).

    lr: linear warmup 0 -> ``derived.peak_lr`` over ``warmup_*``, then cosine to ``optim.min_lr`` at the end.
    Weight decay (``optim.weight_decay`` -> ``optim.weight_decay_end``) and teacher EMA momentum
    (``optim.momentum_start`` -> ``optim.momentum_end``): cosine over the run. Teacher temperature: linear
    ``objective.warmup_teacher_temp`` -> ``objective.teacher_temp`` over ``teacher_temp_warmup_*``, then
    constant. The prototype (last) layer has lr 0 for the first ``freeze_last_layer_*``.
    """

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

    def _given(self, duration: str) -> dict[str, float]:
        values = {u: getattr(self, f"{duration}_{u}") for u in UNITS}
        return {u: v for u, v in values.items() if v is not None}

    def validate(self) -> None:
        for duration in DURATIONS:
            given = self._given(duration)
            if len(given) > 1:
                keys = ", ".join(f"{duration}_{u}={v!r}" for u, v in given.items())
                raise ConfigError(f"got {keys}; expected exactly one of {_units(duration)}", key=f"{duration}_*")
            for unit, value in given.items():
                if duration == "total" and value <= 0:
                    raise invalid(f"{duration}_{unit}", value, "a positive number")
                if value < 0:
                    raise invalid(f"{duration}_{unit}", value, "a non-negative number")

    @property
    def uses_epochs(self) -> bool:
        """Whether a duration is in epochs (then resolving needs the number of samples per epoch)."""
        return any(unit == "epochs" for d in DURATIONS for unit in self._given(d))

    def resolve_steps(self, *, global_batch_size: int, samples_per_epoch: int | None) -> dict[str, int]:
        """``{duration: optimizer steps}`` for every duration (samples and epochs rounded up to whole steps)."""
        if not self._given("total"):
            raise ConfigError(f"none set; expected exactly one of {_units('total')}", key="total_*")
        steps = {}
        for duration in DURATIONS:
            given = self._given(duration)
            if not given:
                steps[duration] = 0
                continue
            unit, value = next(iter(given.items()))
            key = f"{duration}_{unit}"
            if unit == "steps":
                n = int(value)
            elif unit == "samples":
                n = math.ceil(value / global_batch_size)
            elif samples_per_epoch is None:
                raise ConfigError(f"got {value!r}, but the epoch size is unknown; set data.samples_per_epoch or "
                                  f"point data.train at shards with a manifest", key=key)
            else:
                n = math.ceil(value * samples_per_epoch / global_batch_size)
            if duration != "total" and n > steps["total"]:
                raise invalid(key, value, f"at most the run length ({steps['total']} steps; this is {n} steps): "
                              f"shorten it too, e.g. schedule.{duration}_steps={steps['total'] // 10}")
            steps[duration] = n
        return steps


def _units(duration: str) -> str:
    return ", ".join(f"{duration}_{u}" for u in UNITS)


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


def lr_at(step: int, cfg: RunConfig) -> float:
    d = cfg.derived
    return warmup_cosine(
        step,
        total_steps=d.total_steps,
        peak_value=d.peak_lr,
        final_value=cfg.optim.min_lr,
        warmup_steps=d.warmup_steps,
        warmup_start_value=0.0,
    )


def weight_decay_at(step: int, cfg: RunConfig) -> float:
    return warmup_cosine(
        step,
        total_steps=cfg.derived.total_steps,
        peak_value=cfg.optim.weight_decay,
        final_value=cfg.optim.weight_decay_end,
    )


def ema_momentum_at(step: int, cfg: RunConfig) -> float:
    return warmup_cosine(
        step,
        total_steps=cfg.derived.total_steps,
        peak_value=cfg.optim.momentum_start,
        final_value=cfg.optim.momentum_end,
    )


def teacher_temp_at(step: int, cfg: RunConfig) -> float:
    o, warmup_steps = cfg.objective, cfg.derived.teacher_temp_warmup_steps
    if step >= warmup_steps:
        return o.teacher_temp
    fraction = step / warmup_steps
    return o.warmup_teacher_temp + (o.teacher_temp - o.warmup_teacher_temp) * fraction


def last_layer_lr_multiplier(step: int, freeze_steps: int) -> float:
    """0 while the prototype layer is frozen (steps 0 .. freeze_steps - 1), 1 afterwards."""
    return 0.0 if step < freeze_steps else 1.0


def scale_lr(base_lr: float, batch_size: int, *, reference_batch_size: int, rule: str = "linear") -> float:
    """Batch-size scaling: ``linear`` (DINO: lr·B/256), ``sqrt`` (DINOv2: lr·sqrt(B/1024)) or ``none``."""
    if batch_size < 1 or reference_batch_size < 1:
        raise ValueError(f"batch sizes must be positive, got {batch_size} and {reference_batch_size}")
    ratio = batch_size / reference_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "none":
        return base_lr
    raise ValueError(f"lr scaling rule must be 'linear' or 'sqrt' (or 'none'), got {rule!r}")


def layer_decay_scales(backbone: nn.Module, layer_decay: float) -> dict[str, float]:
    """lr scale per backbone parameter name: ``layer_decay ** (n_groups - layer_id)``.

    Layer ids come from the backbone's timm ``group_matcher(coarse=True)``: for ViL the stem (patch/pos
    embed, mask token, middle token) is 0 and block pair i is i + 1 (the final norm joins the last pair); for a
    timm ViT (:class:`~ssl_vil.backbones.vit_adapter.MaskedViT`) the stem (patch/pos embed, [CLS] and register
    tokens, mask token) is 0 and transformer block i is i + 1 (the final norm joins the last block). ``n_groups`` is
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
    from timm.models import group_parameters  # timm loads when a model is built, not for a config check

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


def apply_schedules(optimizer: torch.optim.Optimizer, step: int, cfg: RunConfig) -> dict[str, float]:
    """Set every group's ``lr`` and ``weight_decay`` for ``step`` of the resolved run ``cfg``; returns the
    scheduled scalar values.

    group lr = lr_at(step) · lr_scale · (0 for last-layer groups while frozen);
    group weight_decay = weight_decay_at(step) · wd_scale.
    """
    lr = lr_at(step, cfg)
    wd = weight_decay_at(step, cfg)
    last_mult = last_layer_lr_multiplier(step, cfg.derived.freeze_last_layer_steps)
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
