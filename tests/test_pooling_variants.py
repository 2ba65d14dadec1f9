"""Pooling variants of ViL as the SSL "[CLS]": avg, middle_patch, middle_cls (a learned token in the middle of the
patch sequence), bilateral_avg, bilateral_concat -- for the DINO head, KoLeo and k-NN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import ssl_vil  # noqa: F401  (registers the ViL models)
from ssl_vil.backbones.pooling import patch_tokens, pool_tokens, pooled_dim, token_layout
from ssl_vil.config import load_config
from ssl_vil.export import backbone_kwargs, model_info
from ssl_vil.objectives.masking import MultiCropMaskCollate
from ssl_vil.train.build import build_ssl_objective

SMALL = dict(img_size=32, patch_size=4, dim=32, depth=1, num_classes=0)
POOLINGS = ["avg", "middle_patch", "middle_cls", "bilateral_avg", "bilateral_concat"]
# A tiny DINOv2 ViL2 run: 8 x 8 patches of 32 px globals, 4 x 4 of 16 px locals.
RUN = ["model.name=vil2_tiny_patch16_224", "model.dim=32", "model.depth=1", "model.patch_size=4",
       "model.mlstm_backend=parallel", "data.augment.preset=dinov2", "data.augment.global_size=32",
       "data.augment.local_size=16", "data.augment.n_local=2", "objective.dino_head.out_dim=64",
       "objective.dino_head.hidden_dim=32", "objective.dino_head.bottleneck_dim=16", "objective.ibot_head.out_dim=64",
       "objective.ibot_head.hidden_dim=32", "objective.ibot_head.bottleneck_dim=16", "schedule.total_steps=10",
       "optim.global_batch_size=4"]


def _vil(seed: int = 0, name: str = "vil2_tiny_patch16_224", **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **{**SMALL, **kw})


def _batch(cfg, batch_size: int = 4, seed: int = 0) -> dict:
    import numpy as np
    from PIL import Image

    from ssl_vil.augment import build_multicrop

    a = cfg.data.augment
    transform = build_multicrop("dinov2", global_size=a.global_size, local_size=a.local_size, n_local=a.n_local)
    collate = MultiCropMaskCollate((8, 8), n_global=2)
    rng = np.random.default_rng(seed)
    samples = [{"key": f"k{i}", "label": i % 3,
                "views": transform(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)),
                                   torch.Generator().manual_seed(seed * 1000 + i))} for i in range(batch_size)]
    return collate(samples, torch.Generator().manual_seed(seed))


def _block_input(model: torch.nn.Module, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """The sequence the first block sees."""
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model.forward_features(x, masks=masks)
    finally:
        handle.remove()
    return seen[0]


# ---------------------------------------------------------------------------------------------- pool_tokens
def test_pool_tokens_of_each_kind():
    tokens = torch.randn(2, 9, 4)  # a middle-token sequence: 8 patches + the token at index 4
    plain = torch.randn(2, 8, 4)
    assert torch.equal(pool_tokens(plain, "middle_patch"), plain[:, 4]) and torch.equal(
        pool_tokens(plain, "middle"), plain[:, 4])
    assert torch.equal(pool_tokens(plain, "bilateral_concat"), torch.cat([plain[:, 0], plain[:, -1]], dim=-1))
    assert torch.equal(pool_tokens(plain, "bilateral_avg"), (plain[:, 0] + plain[:, -1]) / 2)
    assert torch.equal(pool_tokens(plain, "avg"), plain.mean(dim=1))
    layout = token_layout(type("M", (), {"cls_token_position": "middle"})())
    assert layout.middle_cls and layout.num_prefix_tokens == 0
    assert torch.equal(pool_tokens(tokens, "middle_cls", layout), tokens[:, 4])
    assert torch.equal(pool_tokens(tokens, "middle_cls"), tokens[:, 4])  # no layout: eval reads the same token
    without = torch.cat([tokens[:, :4], tokens[:, 5:]], dim=1)
    assert torch.equal(patch_tokens(tokens, layout), without)
    assert torch.equal(pool_tokens(tokens, "avg", layout), without.mean(dim=1))
    assert torch.equal(pool_tokens(tokens, "middle_patch", layout), without[:, 4])
    assert torch.equal(pool_tokens(tokens, "bilateral_concat", layout), torch.cat([tokens[:, 0], tokens[:, -1]], -1))
    assert [pooled_dim(4, k) for k in POOLINGS] == [4, 4, 4, 4, 8]
    with pytest.raises(ValueError, match="cls_token='middle'"):
        pool_tokens(plain, "middle_cls", token_layout(object()))
    with pytest.raises(ValueError, match="class token"):
        pool_tokens(plain, "cls", token_layout(object()))


# ------------------------------------------------------------------------------------------ the middle token
def test_default_vil_is_unchanged_and_the_token_changes_nothing_else():
    default, explicit, middle = _vil(), _vil(cls_token=None), _vil(cls_token="middle")
    assert default.cls_token is None and default.cls_token_position is None
    keys = list(default.state_dict())
    assert list(explicit.state_dict()) == keys and "cls_token" not in keys
    assert [k for k in middle.state_dict() if k not in keys] == ["cls_token"]
    assert middle.cls_token.shape == (1, 1, 32) and middle.cls_token.std() > 0
    for k, v in default.state_dict().items():  # the token's init does not shift the other parameters' RNG
        assert torch.equal(v, explicit.state_dict()[k]) and torch.equal(v, middle.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(default.forward_features(x), explicit.forward_features(x))
        assert middle.forward_features(x).shape == (2, 65, 32)
    assert "cls_token" in middle.no_weight_decay()
    from timm.models import group_parameters

    assert group_parameters(middle, middle.group_matcher(), reverse=True)["cls_token"] == 0  # the stem


@pytest.mark.parametrize("name", ["vil2_tiny_patch16_224", "vil_tiny_patch16_224"])
def test_the_token_sits_at_s_over_2_and_masks_never_touch_it(name):
    model = _vil(name=name, cls_token="middle", mask_token=True)
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    plain = _block_input(model, x)
    assert plain.shape == (2, 65, 32)
    assert torch.equal(plain[:, 32], model.cls_token[0].expand(2, -1))  # index S // 2 = 32
    masks = torch.ones(2, 64, dtype=torch.bool)  # every patch masked
    masked = _block_input(model, x, masks)
    assert torch.equal(masked[:, 32], model.cls_token[0].expand(2, -1))
    pos = model.pos_embed(torch.zeros(1, 8, 8, 32)).flatten(1, 2)  # the pos-embed alone
    patches = torch.cat([masked[:, :32], masked[:, 33:]], dim=1)
    assert torch.equal(patches, (model.mask_token + pos).expand(2, -1, -1))
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 65, 32) and torch.isfinite(tokens).all()
    intermediates = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert intermediates[0].shape == (2, 32, 8, 8)  # NCHW: patches only


def test_v2_needs_an_even_number_of_patches_v1_does_not():
    with pytest.raises(ValueError, match="even number of patches"):
        _vil(cls_token="middle").forward_features(torch.randn(1, 3, 12, 12))  # 3 x 3 patches
    v1 = _vil(name="vil_tiny_patch16_224", cls_token="middle")
    assert v1.forward_features(torch.randn(1, 3, 12, 12)).shape == (1, 10, 32)
    with pytest.raises(ValueError, match="cls_token must be None or 'middle'"):
        _vil(cls_token="first")


def test_grid_conv_sees_the_token_as_an_isolated_pixel():
    from ssl_vil.backbones.vil_layer import GridConv2d

    conv = GridConv2d(6)
    x = torch.randn(2, 16, 6)
    token = torch.randn(2, 1, 6)
    with torch.no_grad():
        out = conv(torch.cat([x[:, :8], token, x[:, 8:]], dim=1), (4, 4))
        plain = conv(x, (4, 4))
    assert torch.equal(torch.cat([out[:, :8], out[:, 9:]], dim=1), plain)
    torch.testing.assert_close(out[:, 8], token[:, 0] * conv.weight[:, 0, 1, 1] + conv.bias, rtol=0, atol=0)


# -------------------------------------------------------------------------------------- under the objective
@pytest.mark.parametrize("pooling", POOLINGS)
def test_each_pooling_feeds_dino_and_koleo(pooling):
    torch.set_num_threads(1)
    cfg = load_config(None, [*RUN, f"objective.pooling={pooling}"], world_size=1)
    assert ("cls_token" in backbone_kwargs(cfg)) == (pooling == "middle_cls")
    assert backbone_kwargs(cfg).get("cls_token", "middle") == "middle"
    torch.manual_seed(0)
    obj = build_ssl_objective(cfg)
    backbone = obj.student.backbone
    assert (backbone.cls_token is not None) == (pooling == "middle_cls")
    width = 64 if pooling == "bilateral_concat" else 32
    assert obj.student.dino_head.in_dim == width
    batch = _batch(cfg)
    obj.train()
    out = obj(batch, teacher_temp=0.04)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["koleo"] != 0 and out["ibot"] > 0
    out["loss"].backward()
    for name, p in obj.student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        pooled = obj.student(batch["global_crops"])["global_pooled"]
        tokens = backbone.forward_features(batch["global_crops"])
    assert pooled.shape == (8, width)
    expected = {"avg": lambda t: patch_tokens(t, token_layout(backbone)).mean(dim=1),
                "middle_patch": lambda t: t[:, 32], "middle_cls": lambda t: t[:, 32],
                "bilateral_avg": lambda t: (t[:, 0] + t[:, -1]) / 2,
                "bilateral_concat": lambda t: torch.cat([t[:, 0], t[:, -1]], dim=-1)}[pooling](tokens)
    assert torch.equal(pooled, expected)


def test_middle_cls_token_gets_a_gradient_and_ibot_skips_it():
    torch.set_num_threads(1)
    cfg = load_config(None, [*RUN, "objective.pooling=middle_cls"], world_size=1)
    torch.manual_seed(0)
    obj = build_ssl_objective(cfg)
    batch = _batch(cfg, seed=1)
    out = obj(batch, teacher_temp=0.04)
    out["loss"].backward()
    token = obj.student.backbone.cls_token
    assert token.requires_grad and token.grad is not None and token.grad.abs().sum() > 0
    n = int(batch["n_masked"])
    indices = batch["mask_indices"][:n]
    with torch.no_grad():
        teacher = obj.teacher(batch["global_crops"], None, None, indices)
        tokens = obj.teacher.backbone.forward_features(batch["global_crops"])  # (B, 65, d)
        patches = torch.cat([tokens[:, :32], tokens[:, 33:]], dim=1)
        assert torch.equal(teacher["patch_logits"], obj.teacher.ibot_head(patches.flatten(0, 1)[indices]))
        assert torch.equal(teacher["global_pooled"], tokens[:, 32])


def test_middle_cls_export_and_knn_features(tmp_path: Path):
    """The export records the token (``cls_token`` in model_kwargs) and the pooling; k-NN features read it."""
    from safetensors.torch import save_file

    from ssl_vil.backbones.weights import export_metadata
    from ssl_vil.eval import features as feats
    from ssl_vil.export import load_pretrained_backbone

    cfg = load_config(None, [*RUN, "objective.pooling=middle_cls"], world_size=1)
    info = model_info(cfg)
    assert info["pooling"] == "middle_cls" and info["model_kwargs"]["cls_token"] == "middle"
    assert json.loads(json.dumps(info)) == info
    torch.manual_seed(0)
    obj = build_ssl_objective(cfg)
    teacher = obj.teacher.backbone.eval()
    metadata = export_metadata(info["architecture"], info["model_kwargs"], input_size=tuple(info["input_size"]),
                               mean=tuple(info["mean"]), std=tuple(info["std"]), crop_pct=info["crop_pct"],
                               interpolation=info["interpolation"], pooling=info["pooling"])
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path), metadata=metadata)
    net, loaded = load_pretrained_backbone(path)
    assert net.cls_token_position == "middle" and loaded["pooling"] == "middle_cls"
    pooling = feats.cls_pooling_of(net, loaded)
    assert pooling == "middle_cls"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = teacher.forward_features(x)
        got = feats.pooled_features(net.forward_features(x), "cls", pooling)
    assert torch.equal(got, tokens[:, 32])
    # without the token, a plain export keeps today's kwargs
    assert "cls_token" not in model_info(load_config(None, RUN, world_size=1))["model_kwargs"]


def test_middle_cls_runs_with_row_wise_designs_and_is_refused_with_column_ones():
    from ssl_vil.config import ConfigError

    x = torch.randn(1, 3, 32, 32)
    for design in ("uni", "bi", "bi_shared"):
        model = _vil(cls_token="middle", block_design=design)
        assert model.forward_features(x).shape == (1, 65, 32), design
    with pytest.raises(ConfigError, match=r"objective\.pooling.*model\.block_design='quad'"):
        load_config(None, [*RUN, "objective.pooling=middle_cls", "model.block_design=quad"], world_size=1)
