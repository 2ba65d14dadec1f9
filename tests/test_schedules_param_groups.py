"""Param groups on a real tiny ViL student: weight-decay rules, layer decay per block pair, last layer."""

from __future__ import annotations

import pytest
import timm
import torch

import ssl_vil  # noqa: F401  (registers the ViL models)
from ssl_vil.heads import DINOHeadConfig
from ssl_vil.config import load_config
from ssl_vil.objectives import ObjectiveConfig, build_objective
from ssl_vil.schedules import (
    apply_schedules,
    build_param_groups,
    layer_decay_scales,
    lr_at,
    weight_decay_at,
)

DEPTH = 3


def _objective():
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vil2_tiny_patch16_224", img_size=32, patch_size=4, dim=64, depth=DEPTH, num_classes=0, mask_token=True
    )
    head = DINOHeadConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, batch_norm=True, norm_last_layer=False)
    return build_objective(backbone, ObjectiveConfig(dino_head=head))


def _scale_of(groups):
    return {n: (g["lr_scale"], g["apply_wd"], g["is_last_layer"]) for g in groups for n in g["param_names"]}


def test_layer_decay_scales_per_block_pair():
    obj = _objective()
    scales = layer_decay_scales(obj.student.backbone, 0.5)
    # stem: 0.5^(depth+1); pair i: 0.5^(depth-i); final norm joins the last pair.
    for name, scale in scales.items():
        if name.startswith(("patch_embed", "pos_embed", "mask_token")):
            assert scale == 0.5 ** (DEPTH + 1), name
        elif name.startswith("blocks."):
            pair = int(name.split(".")[1])
            assert scale == 0.5 ** (DEPTH - pair), name
        elif name.startswith("norm."):
            assert scale == 0.5, name
    assert {int(n.split(".")[1]) for n in scales if n.startswith("blocks.")} == set(range(DEPTH))
    assert all(v == 1.0 for v in layer_decay_scales(obj.student.backbone, 1.0).values())


def test_param_groups_rules():
    obj = _objective()
    groups = build_param_groups(obj.student, layer_decay=0.5, patch_embed_lr_mult=0.2)
    info = _scale_of(groups)
    trainable = {n for n, p in obj.student.named_parameters() if p.requires_grad}
    assert set(info) == trainable  # every trainable parameter exactly once, frozen ones excluded
    assert sum(len(g["param_names"]) for g in groups) == len(trainable)
    assert "backbone.legacy_norm.weight" not in info  # classifier path is frozen by the objective
    for name, (lr_scale, apply_wd, is_last) in info.items():
        param = dict(obj.student.named_parameters())[name]
        if name.endswith(".bias") or param.ndim <= 1 or name in ("backbone.pos_embed.embed", "backbone.mask_token"):
            assert not apply_wd, name
        else:
            assert apply_wd, name
        assert is_last == ("last_layer" in name)
        if name.startswith("backbone.patch_embed"):
            assert lr_scale == pytest.approx(0.2 * 0.5 ** (DEPTH + 1))
        if "head" in name.split(".")[0]:
            assert lr_scale == 1.0
    for g in groups:
        assert g["wd_scale"] == (1.0 if g["apply_wd"] else 0.0)
    with pytest.raises(ValueError, match="no backbone module"):
        build_param_groups(obj.student.dino_head)


def test_apply_schedules_sets_group_lr_and_wd():
    obj = _objective()
    groups = build_param_groups(obj.student, layer_decay=0.9, patch_embed_lr_mult=0.2)
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    cfg = load_config(overrides=["schedule.total_steps=100", "optim.lr=1e-3", "optim.lr_scaling=none",
                                 "schedule.warmup_steps=10", "schedule.freeze_last_layer_steps=5"], world_size=1)
    for step in (0, 4, 5, 50):
        values = apply_schedules(optimizer, step, cfg)
        assert values["lr"] == lr_at(step, cfg) and values["weight_decay"] == weight_decay_at(step, cfg)
        for g in optimizer.param_groups:
            frozen = g["is_last_layer"] and step < 5
            assert g["lr"] == (0.0 if frozen else lr_at(step, cfg) * g["lr_scale"])
            assert g["weight_decay"] == weight_decay_at(step, cfg) * g["wd_scale"]
    assert any(g["is_last_layer"] for g in optimizer.param_groups)
