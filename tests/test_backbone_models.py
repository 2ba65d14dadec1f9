"""Registered timm ViL models: sizes, gradients, resolutions, masking, timm contract, pooling, drop path."""

from __future__ import annotations

import pytest
import timm
import torch

import ssl_vil.backbones  # noqa: F401  (registers the timm models)
from ssl_vil.backbones import MODEL_NAMES, VisionLSTM, VisionLSTM2, pool_tokens, pooled_dim
from ssl_vil.backbones.drop_path import ResidualDropPath
from ssl_vil.backbones.vil_layer import GridConv2d

# Spec section 2.3 (224 px, 1000 classes, legacy_norm=True).
SPEC_PARAM_COUNTS = {
    "vil2_tiny_patch16_224": (6_391_528, 513),
    "vil2_small_patch16_224": (23_398_696, 513),
    "vil2_base_patch16_224": (89_263_528, 513),
    "vil_tiny_patch16_224": (6_088_360, 344),
    "vil_tinyplus_patch16_224": (7_277_840, 414),
    "vil_small_patch16_224": (22_792_360, 344),
    "vil_smallplus_patch16_224": (24_628_664, 372),
    "vil_base_patch16_224": (88_050_856, 344),
}
SMALL = dict(img_size=32, patch_size=8, dim=32, depth=2, num_classes=5)


def _small(name: str, **kwargs):
    return timm.create_model(name, **{**SMALL, **kwargs})


def test_registered_names():
    assert set(MODEL_NAMES) == set(SPEC_PARAM_COUNTS)
    assert set(timm.list_models("vil*")) >= set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts_match_spec(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    params, keys = SPEC_PARAM_COUNTS[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_stride8_keeps_pos_embed_and_count():
    with torch.device("meta"):
        model = timm.create_model("vil_tinyplus_patch16_224", stride=8)
    assert sum(p.numel() for p in model.parameters()) == 7_277_840
    assert model.pos_embed.embed.shape == (1, 14, 14, 192)
    assert model.grid_size((224, 224)) == (27, 27)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_parameter_gets_a_finite_gradient(name):
    torch.manual_seed(0)
    model = _small(name, mask_token=True).train()
    image = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 1:3, 1:3] = True
    model(image, masks=masks).square().sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().max() > 0, param_name


def test_overrides_reach_the_constructor():
    model = timm.create_model("vil2_small_patch16_224", img_size=48, patch_size=8, dim=24, depth=3, num_classes=7,
                              drop_path_rate=0.1, pooling="bilateral_avg", legacy_norm=False,
                              mlstm_backend="chunkwise", init_weights="original-fixed")
    assert isinstance(model, VisionLSTM2)
    assert (model.dim, model.depth, model.patch_size, model.num_classes) == (24, 3, 8, 7)
    assert model.embed_dim == model.num_features == 24 and model.head_hidden_size == 24
    assert model.pos_embed.embed.shape == (1, 6, 6, 24)
    assert model.head_norm is None and not hasattr(model, "legacy_norm")
    assert all(layer.mlstm_cell.backend == "chunkwise" for layer in model.layers())
    assert model.blocks[1].rowwise_from_bot_right.drop_path.drop_prob == pytest.approx(0.1)
    v1 = timm.create_model("vil_tiny_patch16_224", img_size=32, patch_size=4, stride=2, dim=16, depth=3)
    assert isinstance(v1, VisionLSTM) and v1.stride == 2
    assert v1.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 15 * 15, 16)
    v2 = timm.create_model("vil2_tiny_patch16_224", img_size=32, patch_size=8, stride=4, dim=16, depth=1)
    assert v2.pos_embed.embed.shape == (1, 4, 4, 16)
    assert v2.forward_features(torch.randn(1, 3, 32, 40)).shape == (1, 7 * 9, 16)
    with pytest.raises(ValueError, match="pooling"):
        timm.create_model("vil2_tiny_patch16_224", pooling="cls")
    with pytest.raises(ValueError, match="mlstm_backend"):
        timm.create_model("vil2_tiny_patch16_224", mlstm_backend="cuda")


@pytest.mark.parametrize("name", ("vil2_tiny_patch16_224", "vil_tiny_patch16_224"))
def test_any_resolution_on_a_224_model(name):
    torch.set_num_threads(1)
    model = timm.create_model(name, num_classes=0).eval()
    with torch.no_grad():
        local_crop = model.forward_features(torch.randn(2, 3, 96, 96))
        wide = model.forward_features(torch.randn(1, 3, 160, 224))
        pooled = model(torch.randn(1, 3, 160, 224))
    assert local_crop.shape == (2, 36, 192)
    assert wide.shape == (1, 10 * 14, 192)
    assert pooled.shape == (1, model.head_hidden_size)
    assert torch.isfinite(local_crop).all() and torch.isfinite(wide).all()


def test_runtime_grid_equals_model_built_for_that_grid():
    """A 224-built model on a 160x224 input == the same weights built at 160x224 (pos-embed resized at load)."""
    torch.manual_seed(0)
    model = _small("vil2_tiny_patch16_224", img_size=64).eval()
    target = _small("vil2_tiny_patch16_224", img_size=(40, 64)).eval()
    ssl_vil.backbones.load_backbone_weights(target, model.state_dict())
    image = torch.randn(2, 3, 40, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(image), target(image), atol=0, rtol=0)


def test_grid_conv_uses_the_runtime_non_square_grid():
    torch.manual_seed(0)
    conv = GridConv2d(4)
    height, width = 3, 5
    x = torch.randn(1, height * width, 4)
    bumped = x.clone()
    row, col = 1, 3
    bumped[0, row * width + col] += 1.0
    changed = (conv(bumped, (height, width)) - conv(x, (height, width))).abs().amax(-1)[0] > 0
    expected = torch.zeros(height, width, dtype=torch.bool)
    expected[row - 1:row + 2, col - 1:col + 2] = True
    assert torch.equal(changed.view(height, width), expected)
    with pytest.raises(ValueError, match="grid"):
        conv(x, (4, 4))


def test_mask_replaces_only_masked_patch_embeddings():
    torch.manual_seed(0)
    model = _small("vil2_tiny_patch16_224", mask_token=True).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    captured = []
    model.pos_embed.register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    image = torch.randn(2, 3, 32, 32)
    masks = torch.rand(2, 4, 4) < 0.4
    masks[0, 0, 0] = True
    with torch.no_grad():
        plain_out = model.forward_features(image)
        masked_out = model.forward_features(image, masks=masks)
        flat_out = model.forward_features(image, masks=masks.flatten(1))
        none_out = model.forward_features(image, masks=torch.zeros_like(masks))
    plain, masked = captured[0], captured[1]
    assert torch.equal(masked[~masks], plain[~masks])
    assert torch.equal(masked[masks], model.mask_token.expand(int(masks.sum()), -1))
    assert not torch.equal(masked_out, plain_out)
    assert torch.equal(flat_out, masked_out) and torch.equal(none_out, plain_out)
    with pytest.raises(ValueError, match="shape"):
        model.forward_features(image, masks=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask token"):
        _small("vil2_tiny_patch16_224").forward_features(image, masks=masks)
    assert "mask_token" not in _small("vil2_tiny_patch16_224").state_dict()


def test_timm_contract_and_pretrained_cfg():
    model = _small("vil2_tiny_patch16_224")
    cfg = model.pretrained_cfg
    assert cfg["classifier"] == "head" and cfg["first_conv"] == "patch_embed.proj"
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == (0.485, 0.456, 0.406)
    assert cfg["std"] == (0.229, 0.224, 0.225)
    assert model.no_weight_decay() == {"pos_embed.embed"}
    assert model.pos_embed.embed.ndim == 4
    assert model.get_classifier() is model.head and model.patch_size == 8
    image = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(image)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True),
                               model.legacy_norm(torch.cat([tokens[:, 0], tokens[:, -1]], -1)))
    model.reset_classifier(0)
    assert model(image).shape == (2, 64)
    model.reset_classifier(3, global_pool="avg")
    assert model.legacy_norm.normalized_shape == (32,) and model(image).shape == (2, 3)
    final, inter = model.forward_intermediates(image, indices=[0])
    assert final.shape == (2, 16, 32) and len(inter) == 1 and inter[0].shape == (2, 32, 4, 4)
    last = model.forward_intermediates(image, indices=1, intermediates_only=True, output_fmt="NLC")
    assert len(last) == 1 and last[0].shape == (2, 16, 32)
    features = timm.create_model("vil2_tiny_patch16_224", features_only=True, out_indices=(0, 1), **SMALL)
    assert [f.shape for f in features(image)] == [(2, 32, 4, 4)] * 2


def test_grad_checkpointing_gives_identical_results():
    torch.manual_seed(0)
    model = _small("vil_tiny_patch16_224")
    image = torch.randn(2, 3, 32, 32)
    out = model(image)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(image)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out, atol=0, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(("name", "depth", "expected_layers"), (
    ("vil2_tiny_patch16_224", 3, {"blocks.0.": 1, "blocks.1.": 2, "blocks.2.": 3}),
    ("vil_tiny_patch16_224", 6, {"blocks.0.": 1, "blocks.1.": 1, "blocks.2.": 2, "blocks.3.": 2, "blocks.5.": 3}),
))
def test_layer_decay_groups_count_block_pairs(name, depth, expected_layers):
    from timm.optim import create_optimizer_v2
    from timm.optim._param_groups import param_groups_layer_decay

    model = _small(name, depth=depth, mask_token=True)
    assert model.num_layers_for_decay == 5
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    name_of = {id(p): n for n, p in model.named_parameters()}
    scale_of = {name_of[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scale_of) == len(name_of)
    assert scale_of["patch_embed.proj.weight"] == scale_of["pos_embed.embed"] == scale_of["mask_token"] == 0.5 ** 4
    for prefix, layer in expected_layers.items():
        assert {s for n, s in scale_of.items() if n.startswith(prefix)} == {0.5 ** (4 - layer)}, prefix
    final_norm = "norm.weight" if name.startswith("vil2") else "legacy_norm.weight"
    assert scale_of[final_norm] == 0.5  # joins the last layer
    assert scale_of["head.weight"] == 1.0
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed.embed) in no_decay and id(model.mask_token) in no_decay
    assert id(model.patch_embed.proj.weight) not in no_decay


def test_pool_tokens_kinds():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    torch.testing.assert_close(pool_tokens(tokens, "bilateral_concat"), torch.cat([tokens[:, 0], tokens[:, 4]], 1))
    torch.testing.assert_close(pool_tokens(tokens, "bilateral_flatten"), pool_tokens(tokens, "bilateral_concat"))
    torch.testing.assert_close(pool_tokens(tokens, "bilateral_avg"), (tokens[:, 0] + tokens[:, 4]) / 2)
    torch.testing.assert_close(pool_tokens(tokens, "avg"), tokens.mean(1))
    torch.testing.assert_close(pool_tokens(tokens, "middle"), tokens[:, 2])
    assert [pooled_dim(3, k) for k in ("bilateral_concat", "bilateral_avg", "avg")] == [6, 3, 3]
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_tokens(tokens, "class_token")  # ("cls" is the ViT pooling now: tests/test_backbone_vit.py)
    with pytest.raises(ValueError, match=r"\(B, S, d\)"):
        pool_tokens(tokens[0], "avg")


def test_drop_path_subset_and_fallback():
    torch.manual_seed(0)
    drop = ResidualDropPath(0.2).train()
    x = torch.zeros(10, 3)
    out = drop(x, lambda y: torch.ones_like(y))
    rows = out[:, 0]
    assert sorted(rows.tolist()) == [0.0] * 2 + [1.25] * 8  # keep 8 of 10, scaled by 10 / 8
    assert torch.equal(out, rows[:, None].expand(-1, 3))
    fallback = ResidualDropPath(0.5).train()  # 3 samples: keep ratio 1/3 is too far from 0.5 -> Bernoulli
    values = set(fallback(torch.zeros(3, 2), lambda y: torch.ones_like(y)).flatten().tolist())
    assert values <= {0.0, 2.0}
    torch.testing.assert_close(drop.eval()(x, lambda y: y + 1), x + 1)
    with pytest.raises(ValueError):
        ResidualDropPath(1.0)


@pytest.mark.parametrize("init_weights", ("original", "original-fixed"))
def test_official_init(init_weights):
    """Spec section 4: small init N(0, sqrt(2 / 5d)), proj_down N(0, 2 / (num_blocks sqrt(d))), gate biases etc."""
    torch.manual_seed(0)
    dim, depth = 192, 2
    model = VisionLSTM2(img_size=64, patch_size=16, dim=dim, depth=depth, num_classes=1000, legacy_norm=True,
                        init_weights=init_weights)
    layer = model.blocks[1].rowwise_from_bot_right.layer
    small = (2 / (5 * dim)) ** 0.5
    num_blocks = 1 if init_weights == "original" else 2 * depth
    assert layer.proj_up.weight.std().item() == pytest.approx(small, rel=0.03)
    assert layer.q_proj.weight.std().item() == pytest.approx(small, rel=0.05)
    assert layer.proj_down.weight.std().item() == pytest.approx(2 / (num_blocks * dim ** 0.5), rel=0.03)
    for bias in (layer.proj_up.bias, layer.q_proj.bias, layer.proj_down.bias, model.head.bias):
        assert torch.count_nonzero(bias) == 0
    cell = layer.mlstm_cell
    assert torch.count_nonzero(cell.igate.weight) == 0 and torch.count_nonzero(cell.fgate.weight) == 0
    assert torch.equal(cell.fgate.bias, torch.tensor([3.0, 4.0, 5.0, 6.0]))
    assert 0 < cell.igate.bias.abs().max() < 0.5
    assert torch.count_nonzero(cell.outnorm.weight) == 0 and torch.equal(layer.learnable_skip, torch.ones(2 * dim))
    assert torch.count_nonzero(model.norm.weight) == 0
    assert torch.count_nonzero(model.blocks[0].rowwise_from_top_left.norm.weight) == 0
    assert torch.equal(model.legacy_norm.weight, torch.ones(2 * dim))
    assert model.head.weight.std().item() == pytest.approx(2e-5, rel=0.03)
    assert model.pos_embed.embed.std().item() == pytest.approx(0.02, rel=0.1)
    fan_in, fan_out = 3 * 16 * 16, dim
    bound = (6 / (fan_in + fan_out)) ** 0.5  # xavier-uniform on the weight viewed as a (d, 3 * 16 * 16) matrix
    assert model.patch_embed.proj.weight.abs().max().item() == pytest.approx(bound, rel=0.01)
    with pytest.raises(ValueError, match="init_weights"):
        VisionLSTM2(dim=32, depth=1, init_weights="xavier")
