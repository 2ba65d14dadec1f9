"""Feature maps for dense prediction heads: ``forward_intermediates(..., output_fmt="NCHW")`` of ViL v2 / v1 and of a
timm ViT wrapped by ``MaskedViT``, at input sizes other than the built one (non-square, overlapping patches, the
ViL middle token), timm's ``features_only`` / ``FeatureGetterNet`` on top, and a head built from ``feature_info``."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models._features import FeatureGetterNet, FeatureInfo
from torch import nn

import ssl_vil  # noqa: F401  (registers the ViL models)
from ssl_vil.backbones.vit_adapter import MaskedViT, create_vit_backbone

VIL_NAMES = ("vil2_tiny_patch16_224", "vil_tiny_patch16_224")
VIL_TINY = dict(img_size=64, patch_size=8, dim=64, depth=2, num_classes=0)
VIT_TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2)
# (H, W) -> the patch-8 grid (H / 8, W / 8): the built size, a non-square size and a larger square one.
GRIDS_P8 = {(64, 64): (8, 8), (96, 128): (12, 16), (128, 128): (16, 16)}
# Patch 16, stride 8: ((H - 16) // 8 + 1, (W - 16) // 8 + 1).
GRIDS_P16_S8 = {(64, 64): (7, 7), (96, 128): (11, 15), (128, 128): (15, 15)}


def _vil(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **{**VIL_TINY, **kwargs}).eval()


def _vit(seed: int = 0, **kwargs) -> MaskedViT:
    torch.manual_seed(seed)
    return create_vit_backbone("vit_tiny_patch16_224", **{**VIT_TINY, **kwargs}).eval()


def _image(height: int, width: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _as_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens (B, h * w, d), row-major -> (B, d, h, w)."""
    return tokens.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1]).permute(0, 3, 1, 2)


def _without_middle(tokens: torch.Tensor) -> torch.Tensor:
    """(B, S + 1, d) with the middle token at index S // 2 -> the (B, S, d) patches."""
    middle = (tokens.shape[1] - 1) // 2
    return torch.cat([tokens[:, :middle], tokens[:, middle + 1:]], dim=1)


# ------------------------------------------------------------------------------------------------------ ViL
@pytest.mark.parametrize("cls_token", [None, "middle"])
@pytest.mark.parametrize("name", VIL_NAMES)
@torch.no_grad()
def test_vil_maps_have_the_runtime_grid_and_are_the_tokens_reshaped(name, cls_token):
    model = _vil(name, cls_token=cls_token)
    for (height, width), grid in GRIDS_P8.items():
        x = _image(height, width)
        assert model.grid_size((height, width)) == grid
        maps = model.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
        assert [tuple(m.shape) for m in maps] == [(2, 64, *grid)] * 2
        tokens = model.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", intermediates_only=True)
        n_tokens = grid[0] * grid[1] + (cls_token is not None)
        assert [tuple(t.shape) for t in tokens] == [(2, n_tokens, 64)] * 2
        for feature_map, sequence in zip(maps, tokens):
            patches = _without_middle(sequence) if cls_token else sequence
            assert patches.shape[1] == grid[0] * grid[1]  # the middle token is no position of the map
            assert torch.equal(feature_map, _as_map(patches, grid))
        # norm=True: the last map is forward_features' output (final norm) at the patch positions.
        last = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        final = model.forward_features(x)
        assert final.shape == (2, n_tokens, 64)
        assert torch.equal(last, _as_map(_without_middle(final) if cls_token else final, grid))
        assert not torch.equal(last, maps[1])


@pytest.mark.parametrize("name", VIL_NAMES)
@torch.no_grad()
def test_vil_norm_applies_the_final_norm_to_every_map(name):
    model = _vil(name, cls_token="middle")
    x = _image(96, 128)
    tokens = model.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", intermediates_only=True)
    normed = model.forward_intermediates(x, indices=[0, 1], norm=True, intermediates_only=True)
    for sequence, feature_map in zip(tokens, normed):
        assert torch.equal(feature_map, _as_map(_without_middle(model.final_norm(sequence)), (12, 16)))
    # Stopping after the first block changes nothing for it.
    early = model.forward_intermediates(x, indices=[0], norm=True, stop_early=True, intermediates_only=True)
    assert len(early) == 1 and torch.equal(early[0], normed[0])


@pytest.mark.parametrize("name", VIL_NAMES)
@torch.no_grad()
def test_vil_overlapping_patches_give_the_stride_grid_and_stride_reduction(name):
    model = _vil(name, patch_size=16, stride=8)
    assert model.feature_info == [dict(num_chs=64, reduction=8, module="blocks.0"),
                                  dict(num_chs=64, reduction=8, module="blocks.1")]
    for (height, width), grid in GRIDS_P16_S8.items():
        assert grid == ((height - 16) // 8 + 1, (width - 16) // 8 + 1) == model.grid_size((height, width))
        maps = model.forward_intermediates(_image(height, width), indices=[0, 1], intermediates_only=True)
        assert [tuple(m.shape) for m in maps] == [(2, 64, *grid)] * 2


@pytest.mark.parametrize("name", VIL_NAMES)
@torch.no_grad()
def test_timm_features_only_reports_channels_and_stride_and_matches_the_model(name):
    kwargs = dict(img_size=64, patch_size=16, stride=8, dim=64, depth=2)
    torch.manual_seed(0)
    features = timm.create_model(name, pretrained=False, features_only=True, out_indices=(0, 1), **kwargs).eval()
    assert isinstance(features, FeatureGetterNet)
    assert features.feature_info.channels() == [64, 64]
    assert features.feature_info.reduction() == [8, 8]  # the stride, not the patch size 16
    model = _vil(name, **kwargs)
    for (height, width), grid in GRIDS_P16_S8.items():
        x = _image(height, width)
        out = features(x)
        assert [tuple(m.shape) for m in out] == [(2, 64, *grid)] * 2
        reference = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(out, reference))


def test_vil_rejects_an_input_smaller_than_a_patch_or_with_other_channels():
    model = _vil("vil2_tiny_patch16_224")
    with pytest.raises(ValueError, match="input 4x64 is smaller than the patch size 8"):
        model.forward_intermediates(torch.randn(1, 3, 4, 64))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\), got \(1, 1, 64, 64\)"):
        model.forward_intermediates(torch.randn(1, 1, 64, 64))


# ------------------------------------------------------------------------------------------------------ ViT
def test_vit_feature_info_describes_the_blocks():
    model = _vit()
    assert model.feature_info == [dict(num_chs=64, reduction=8, module="vit.blocks.0"),
                                  dict(num_chs=64, reduction=8, module="vit.blocks.1")]
    assert [name for name, _ in model.named_modules() if name.startswith("vit.blocks.")
            and name.count(".") == 2] == ["vit.blocks.0", "vit.blocks.1"]


@torch.no_grad()
def test_vit_maps_have_the_runtime_grid_and_drop_the_prefix_tokens():
    model = _vit(reg_tokens=2)  # [CLS] + 2 registers = 3 prefix tokens
    assert model.num_prefix_tokens == 3
    for (height, width), grid in GRIDS_P8.items():
        x = _image(height, width)
        assert model.grid_size((height, width)) == grid
        maps = model.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
        assert [tuple(m.shape) for m in maps] == [(2, 64, *grid)] * 2
        pairs = model.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", intermediates_only=True,
                                            return_prefix_tokens=True)
        for feature_map, (patches, prefix) in zip(maps, pairs):
            assert patches.shape == (2, grid[0] * grid[1], 64) and prefix.shape == (2, 3, 64)
            assert torch.equal(feature_map, _as_map(patches, grid))
        final, last = model.forward_intermediates(x, indices=1, norm=True, return_prefix_tokens=True)
        features = model.forward_features(x)
        assert torch.equal(final, features) and features.shape == (2, 3 + grid[0] * grid[1], 64)
        assert torch.equal(last[0][0], _as_map(features[:, 3:], grid))
        assert torch.equal(last[0][1], features[:, :3])
        as_dict = model.forward_intermediates(x, indices=[1], norm=True, output_dict=True, return_prefix_tokens=True)
        assert torch.equal(as_dict["image_intermediates"][0], last[0][0])
        assert torch.equal(as_dict["image_intermediates_prefix"][0], features[:, :3])
        assert torch.equal(as_dict["image_features"], features)


@torch.no_grad()
def test_vit_matches_timms_forward_intermediates_where_that_runs():
    model = _vit()
    for height, width in ((64, 64), (96, 128)):
        x = _image(height, width)
        for kwargs in (dict(output_fmt="NCHW"), dict(output_fmt="NLC", norm=True, return_prefix_tokens=True)):
            ours = model.forward_intermediates(x, indices=2, intermediates_only=True, **kwargs)
            timms = model.vit.forward_intermediates(x, indices=2, intermediates_only=True, **kwargs)
            flat = [t for item in ours for t in (item if isinstance(item, tuple) else (item,))]
            flat_timm = [t for item in timms for t in (item if isinstance(item, tuple) else (item,))]
            assert len(flat) == len(flat_timm) == (2 if kwargs["output_fmt"] == "NCHW" else 4)
            assert all(torch.equal(a, b) for a, b in zip(flat, flat_timm))


@torch.no_grad()
def test_a_vit_built_without_dynamic_img_size_runs_at_any_size_and_is_unchanged_at_its_own():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=False,
                            **VIT_TINY).eval()
    x = _image(64, 64)
    before = vit.forward_features(x)
    with pytest.raises(AssertionError):  # what timm's ViT does with another size
        vit.forward_intermediates(_image(96, 128))
    model = MaskedViT(vit).eval()
    assert torch.equal(model.forward_features(x), before)
    dynamic = _vit()
    for (height, width), grid in GRIDS_P8.items():
        image = _image(height, width)
        maps = model.forward_intermediates(image, indices=[0, 1], intermediates_only=True)
        assert [tuple(m.shape) for m in maps] == [(2, 64, *grid)] * 2
        reference = dynamic.forward_intermediates(image, indices=[0, 1], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(maps, reference))


def test_vit_rejects_a_size_that_is_not_a_multiple_of_the_patch():
    model = _vit()
    with pytest.raises(ValueError, match="input 60x64 is not a positive multiple of the patch size 8x8"):
        model.forward_intermediates(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64), output_fmt="NHWC")


# ---------------------------------------------------------------------------------------------------- heads
class FeatureInfoHead(nn.Module):
    """A dense head built from a ``FeatureInfo`` only: one 1x1 conv per map (in_channels from the info), the
    projections upsampled to the input size and summed, then per-pixel logits (B, num_classes, H, W)."""

    def __init__(self, info: FeatureInfo, num_classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.reductions = info.reduction()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in info.channels())
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        fused = sum(F.interpolate(conv(m), size=size, mode="bilinear", align_corners=False)
                    for conv, m in zip(self.lateral, maps))
        return self.classifier(fused)


def _check_dense_training_step(backbone: nn.Module, not_taking_part: set[str], grid: tuple[int, int],
                               size: tuple[int, int]) -> None:
    """timm's FeatureGetterNet on ``backbone``, a head from its feature_info, one backward: every backbone
    parameter but ``not_taking_part`` gets a non-zero gradient, those get none."""
    net = FeatureGetterNet(backbone, out_indices=(0, 1))
    head = FeatureInfoHead(net.feature_info)
    maps = net(_image(*size))
    assert [tuple(m.shape) for m in maps] == [(2, c, *grid) for c in net.feature_info.channels()]
    logits = head(maps, size)
    assert logits.shape == (2, 3, *size)
    F.cross_entropy(logits, torch.randint(0, 3, (2, *size), generator=torch.Generator().manual_seed(0))).backward()
    params = dict(backbone.named_parameters())
    assert not_taking_part < set(params)
    without = sorted(n for n, p in params.items() if n not in not_taking_part and (p.grad is None or not p.grad.any()))
    assert without == []
    assert sorted(n for n in not_taking_part if params[n].grad is not None) == []
    assert all(p.grad is not None and p.grad.any() for p in head.parameters())


@pytest.mark.parametrize(("name", "kwargs", "grid"), [
    ("vil2_tiny_patch16_224", dict(cls_token="middle"), (12, 16)),
    ("vil_tiny_patch16_224", dict(cls_token="middle"), (12, 16)),
    ("vil2_tiny_patch16_224", dict(patch_size=16, stride=8), (11, 15)),
])
def test_a_head_from_feature_info_trains_the_vil_backbone(name, kwargs, grid):
    backbone = _vil(name, **kwargs).train()
    assert backbone.head_norm is not None  # the pooled-feature norm before the classifier, unused by maps
    unused = {f"{backbone._head_norm_name}.{n}" for n, _ in backbone.head_norm.named_parameters()}
    _check_dense_training_step(backbone, unused, grid, (96, 128))
    assert backbone.final_norm.__class__ is nn.Identity  # pruned: the maps are taken before it (norm=False)
    if kwargs.get("cls_token"):
        assert backbone.cls_token.grad.any()  # the middle token feeds the maps through the recurrence


def test_a_head_from_feature_info_trains_the_vit_backbone():
    backbone = _vit(mask_token=True).train()
    # The mask token is used only with masks; the final norm is pruned (maps are taken before it).
    _check_dense_training_step(backbone, {"mask_token"}, (12, 16), (96, 128))
    assert isinstance(backbone.vit.norm, nn.Identity) and backbone.depth == 2
    assert backbone.vit.cls_token.grad.any() and backbone.vit.pos_embed.grad.any()
