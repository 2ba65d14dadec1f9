"""Any timm VisionTransformer as the SSL backbone (DINOv2's [CLS] / patch split, a learned iBOT mask token, any input
size, layer-wise lr decay over blocks), its config checks, its exact resume, and its export into stock timm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ssl_vil  # noqa: F401  (registers the ViL models)
from ssl_vil.backbones.pooling import pool_tokens, token_layout
from ssl_vil.backbones.vit_adapter import MaskedViT, create_vit_backbone, timm_state_dict
from ssl_vil.config import ConfigError, load_config
from ssl_vil.export import architecture_kwargs, backbone_kwargs
from ssl_vil.objectives.masking import MultiCropMaskCollate
from ssl_vil.train.build import build_backbone, build_optimizer, build_ssl_objective

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
# A config-built tiny ViT (ViT-T's head width 64: dim 64 -> 1 head) with a small head, 32 px globals, 16 px locals.
VIT_RUN = ["model.name=vit_tiny_patch16_224", "model.dim=64", "model.depth=2", "model.patch_size=4",
           "data.augment.preset=dinov2", "data.augment.global_size=32", "data.augment.local_size=16",
           "data.augment.n_local=2", "objective.dino_head.out_dim=64", "objective.dino_head.hidden_dim=32",
           "objective.dino_head.bottleneck_dim=16", "objective.ibot_head.out_dim=64",
           "objective.ibot_head.hidden_dim=32", "objective.ibot_head.bottleneck_dim=16",
           "schedule.total_steps=10", "optim.global_batch_size=4", "optim.layer_decay=0.5",
           "optim.patch_embed_lr_mult=0.2"]


def _vit(seed: int = 0, **kw) -> MaskedViT:
    torch.manual_seed(seed)
    return create_vit_backbone("vit_tiny_patch16_224", **{**TINY, "mask_token": True, **kw})


def _batch(cfg, batch_size: int = 4, seed: int = 0) -> dict:
    """A real multi-crop + mask collate batch of random images, at the config's sizes."""
    import numpy as np
    from PIL import Image

    from ssl_vil.augment import build_multicrop

    a = cfg.data.augment
    transform = build_multicrop("dinov2", global_size=a.global_size, local_size=a.local_size, n_local=a.n_local)
    grid = a.global_size // cfg.model.patch_size
    collate = MultiCropMaskCollate((grid, grid), n_global=2)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(batch_size):
        image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
        samples.append({"key": f"k{i}", "label": i % 3,
                        "views": transform(image, torch.Generator().manual_seed(seed * 1000 + i))})
    return collate(samples, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- the adapter
def test_unmasked_forward_is_timms_and_the_layout_is_cls_first():
    model = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 64, 32)
    assert torch.equal(tokens, model.vit.forward_features(x))  # the adapter adds nothing without masks
    assert token_layout(model).num_prefix_tokens == 1 and not token_layout(model).middle_cls
    assert torch.equal(pool_tokens(tokens, "cls", token_layout(model)), tokens[:, 0])
    assert torch.equal(pool_tokens(tokens, "avg", token_layout(model)), tokens[:, 1:].mean(dim=1))
    assert list(model.state_dict())[0] == "mask_token" and model.mask_token.shape == (1, 32)
    assert "mask_token" not in timm_state_dict(model.state_dict())
    assert set(timm_state_dict(model.state_dict())) == set(model.vit.state_dict())


def test_mask_token_replaces_exactly_the_masked_patches_before_the_pos_embed():
    model = _vit()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, [0, 5, 63]] = True
    masks[1, 17] = True
    with torch.no_grad():
        plain, masked = model.embed(x), model.embed(x, masks)
        pos = model.vit.pos_embed[0]  # (1 + 64, d); trained size: no interpolation
    changed = (plain != masked).any(dim=-1)  # (B, 1 + S)
    assert torch.equal(changed[:, 1:], masks) and not changed[:, 0].any()
    for b, i in masks.nonzero().tolist():
        assert torch.equal(masked[b, 1 + i], model.mask_token[0] + pos[1 + i])
    # (B, h, w) masks are the same masks
    with torch.no_grad():
        assert torch.equal(model.embed(x, masks.reshape(2, 8, 8)), masked)
    with pytest.raises(ValueError, match="masks must have shape"):
        model.embed(x, torch.zeros(2, 65, dtype=torch.bool))
    with pytest.raises(ValueError, match="no mask token"):
        _vit(mask_token=False).embed(x, masks)


def test_local_crops_of_another_size_interpolate_the_pos_embed():
    from timm.layers import resample_abs_pos_embed

    model = _vit().eval()
    small = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(small)
        embedded = model.embed(small)
        patches = model.vit.patch_embed(small).reshape(3, 16, 32)
        pos = resample_abs_pos_embed(model.vit.pos_embed, new_size=(4, 4), old_size=(8, 8), num_prefix_tokens=1)
    assert tokens.shape == (3, 1 + 16, 32) and torch.isfinite(tokens).all()
    assert torch.equal(embedded[:, 1:], patches + pos[:, 1:])
    assert torch.equal(embedded[:, 0], (model.vit.cls_token + pos[:, :1]).expand(3, -1, -1)[:, 0])
    # non-square and large inputs too
    assert model.forward_features(torch.randn(1, 3, 24, 40)).shape == (1, 1 + 6 * 10, 32)


def test_layer_decay_groups_are_stem_blocks_head():
    from ssl_vil.schedules import layer_decay_scales

    model = _vit()
    assert model.num_layers_for_decay == 4
    scales = layer_decay_scales(model, 0.5)
    # 2 blocks: stem 0.5 ** 3, block 0 0.5 ** 2, block 1 and the final norm 0.5 (the heads sit above, scale 1)
    expected = {"mask_token": 0.125, "vit.cls_token": 0.125, "vit.pos_embed": 0.125,
                "vit.patch_embed.proj.weight": 0.125, "vit.norm.weight": 0.5, "vit.norm.bias": 0.5}
    for name, scale in scales.items():
        if name.startswith("vit.blocks."):
            assert scale == (0.25 if name.startswith("vit.blocks.0.") else 0.5), name
    assert {k: scales[k] for k in expected} == expected
    assert model.no_weight_decay() >= {"mask_token", "vit.pos_embed", "vit.cls_token"}


# ----------------------------------------------------------------------------------------------- config checks
def test_config_resolves_a_vit_run():
    cfg = load_config(None, VIT_RUN, world_size=1)
    assert cfg.objective.pooling == "cls"  # the ViT default
    assert backbone_kwargs(cfg) == {"img_size": 32, "patch_size": 4, "dynamic_img_size": True, "embed_dim": 64,
                                    "num_heads": 1, "depth": 2}
    assert backbone_kwargs(load_config(None, [*VIT_RUN, "model.dim=128"], world_size=1))["num_heads"] == 2
    small = load_config(None, ["model.name=vit_small_patch16_224", "schedule.total_steps=10"], world_size=1)
    assert architecture_kwargs(small) == {"img_size": 224, "patch_size": 16, "dynamic_img_size": True,
                                          "embed_dim": 384, "num_heads": 6, "depth": 12}
    assert load_config(None, [*VIT_RUN, "objective.pooling=avg"], world_size=1).objective.pooling == "avg"
    # ViL runs keep their default
    assert load_config(None, ["schedule.total_steps=10"], world_size=1).objective.pooling == "bilateral_concat"


@pytest.mark.parametrize("pooling", ["bilateral_concat", "bilateral_avg", "middle_patch", "middle_cls", "first"])
def test_a_vil_pooling_on_a_vit_is_a_config_error(pooling):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*VIT_RUN, f"objective.pooling={pooling}"], world_size=1)
    message = str(error.value)
    assert "objective.pooling" in message and repr(pooling) in message
    assert "expected one of cls, avg" in message and "vit_tiny_patch16_224" in message


def test_cls_on_a_vil_and_unknown_models_are_config_errors():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["schedule.total_steps=10", "objective.pooling=cls"], world_size=1)
    message = str(error.value)
    assert "objective.pooling" in message and "'cls'" in message and "a ViL backbone" in message
    assert "bilateral_concat, bilateral_avg, avg, middle_patch, middle_cls" in message
    with pytest.raises(ConfigError, match=r"model\.name.*'resnet18'.*timm VisionTransformer"):
        load_config(None, ["schedule.total_steps=10", "model.name=resnet18"], world_size=1)
    with pytest.raises(ConfigError, match=r"model\.dim.*a multiple of 64"):
        load_config(None, [*VIT_RUN, "model.dim=96"], world_size=1)


# ------------------------------------------------------------------------------------------- DINOv2 on a ViT
def test_dinov2_on_a_tiny_vit_trains_with_a_gradient_on_every_parameter():
    torch.set_num_threads(1)
    cfg = load_config(None, VIT_RUN, world_size=1)
    torch.manual_seed(0)
    obj = build_ssl_objective(cfg)
    backbone = obj.student.backbone
    assert isinstance(backbone, MaskedViT) and backbone.mask_token is not None
    assert obj.pooling == "cls" and obj.student.dino_head.in_dim == 64  # [CLS] width, not 2d
    optimizer = build_optimizer(cfg, obj.student)
    scales = {n: g["lr_scale"] for g in optimizer.param_groups for n in g["param_names"]}
    assert scales["backbone.mask_token"] == scales["backbone.vit.cls_token"] == 0.5 ** 3
    assert scales["backbone.vit.patch_embed.proj.weight"] == 0.5 ** 3 * 0.2
    assert scales["backbone.vit.blocks.0.attn.qkv.weight"] == 0.25
    assert scales["backbone.vit.blocks.1.mlp.fc2.weight"] == scales["backbone.vit.norm.weight"] == 0.5
    assert scales["dino_head.mlp.0.weight"] == 1.0
    from ssl_vil.schedules import apply_schedules

    obj.train()
    for step in range(3):
        batch = _batch(cfg, seed=step)
        values = apply_schedules(optimizer, step, cfg)
        out = obj(batch, teacher_temp=values["teacher_temp"])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert all(torch.isfinite(v).all() for v in out.values()), {k: float(v) for k, v in out.items()}
        assert out["ibot"] > 0 and out["koleo"] != 0 and out["mask_ratio"] > 0
        if step == 0:
            trainable = [(n, p) for n, p in obj.student.named_parameters() if p.requires_grad]
            assert "backbone.mask_token" in dict(trainable)
            for name, p in trainable:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        optimizer.step()
        obj.update_teacher(values["ema_momentum"])
        obj.commit_step()


def test_patch_logits_come_from_patch_tokens_only():
    """The iBOT head sees the patch tokens at ``mask_indices`` (flat over B x S), never the [CLS] token."""
    torch.set_num_threads(1)
    cfg = load_config(None, VIT_RUN, world_size=1)
    torch.manual_seed(0)
    obj = build_ssl_objective(cfg).eval()
    batch = _batch(cfg)
    n = int(batch["n_masked"])
    indices = batch["mask_indices"][:n]
    with torch.no_grad():
        out = obj.teacher(batch["global_crops"], None, None, indices)
        tokens = obj.teacher.backbone.forward_features(batch["global_crops"])
        expected = obj.teacher.ibot_head(tokens[:, 1:].flatten(0, 1)[indices])
    assert torch.equal(out["patch_logits"], expected)
    assert torch.equal(out["global_pooled"], tokens[:, 0])


def test_a_vit_without_ibot_has_no_mask_token():
    cfg = load_config(None, [*VIT_RUN, "objective.ibot_weight=0"], world_size=1)
    assert build_backbone(cfg).mask_token is None


# ----------------------------------------------------------------------------------- trainer, resume, export
STEPS = 12

# Runs in a fresh interpreter that never imports ssl_vil: stock timm only.
STOCK_LOAD = textwrap.dedent("""
    import json, sys
    import torch, timm

    torch.set_num_threads(1)
    weights, info, reference = sys.argv[1], json.load(open(sys.argv[2])), torch.load(sys.argv[3])
    kwargs = {k: v for k, v in info["model_kwargs"].items()}
    model = timm.create_model(info["architecture"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=weights), **kwargs).eval()
    with torch.no_grad():
        tokens = model.forward_features(reference["x"])
        pooled = model.forward_head(tokens, pre_logits=True)
        small = model.forward_features(reference["small"])
    print(json.dumps({
        "ssl_vil_imported": any(m.startswith("ssl_vil") for m in sys.modules),
        "tokens_equal": torch.equal(tokens, reference["tokens"]),
        "cls_equal": torch.equal(pooled, reference["cls"]),
        "small_equal": torch.equal(small, reference["small_tokens"]),
        "type": type(model).__name__, "num_classes": model.num_classes,
    }))
""")


@pytest.fixture(scope="module")
def vit_runs(tmp_path_factory):
    from trainer_harness import logs, run_training, tiny_overrides, write_shards

    root = tmp_path_factory.mktemp("vit_resume")
    write_shards(root / "shards", n_shards=3, per_shard=16)
    overrides = tiny_overrides(root / "shards", total_steps=STEPS, workers=1) + [
        "model.name=vit_tiny_patch16_224", "objective.pooling=cls", "optim.layer_decay=0.9",
        "optim.patch_embed_lr_mult=0.2"]
    ref = root / "reference"
    assert run_training(ref, overrides, world_size=1) == [0], logs(ref)
    return root, overrides, ref


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vit_sigkill_resume_is_exact(vit_runs):
    from trainer_harness import assert_tree_equal, final_payload, launch, logs, losses, wait_all

    root, overrides, ref = vit_runs
    ref_losses = losses(ref)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    assert all(v == v and abs(v) < 1e6 for v in ref_losses.values())  # finite
    run = root / "killed"
    procs = launch(run, overrides, world_size=1, fault="kill:step=7,rank=0,at=mid_step")
    while procs[0].poll() is None:
        time.sleep(0.2)
    assert procs[0].returncode == -signal.SIGKILL, logs(run)
    assert wait_all(launch(run, overrides, world_size=1)) == [0], logs(run)
    resumed = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if '"event": "resumed"' in line]
    assert resumed == [5]
    assert losses(run) == ref_losses  # bitwise, every step
    a, b = final_payload(ref), final_payload(run)
    for part in ("objective", "optimizer", "train_state"):
        assert_tree_equal(a[part], b[part], part)
    assert (run / "export" / "teacher_backbone.safetensors").read_bytes() == \
        (ref / "export" / "teacher_backbone.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vit_export_loads_into_stock_timm_without_ssl_vil(vit_runs, tmp_path):
    from trainer_harness import final_payload

    _, _, ref = vit_runs
    export = ref / "export"
    info = json.loads((export / "model.json").read_text())
    assert info["architecture"] == "vit_tiny_patch16_224" and info["pooling"] == "cls"
    assert info["model_kwargs"] == {"img_size": 32, "patch_size": 4, "dynamic_img_size": True, "embed_dim": 64,
                                    "num_heads": 1, "depth": 2}
    from safetensors.torch import load_file

    exported = load_file(str(export / "teacher_backbone.safetensors"))
    assert "mask_token" not in exported and not any(k.startswith("vit.") for k in exported)
    # The teacher backbone, rebuilt from the checkpoint (not from the export).
    prefix = "teacher.backbone."
    state = {k[len(prefix):]: v for k, v in final_payload(ref)["objective"].items() if k.startswith(prefix)}
    assert "mask_token" in state
    teacher = create_vit_backbone("vit_tiny_patch16_224", mask_token=True, **info["model_kwargs"]).eval()
    teacher.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            tokens = teacher.forward_features(x)
            reference = {"x": x, "tokens": tokens, "cls": pool_tokens(tokens, "cls", token_layout(teacher)),
                         "small": small, "small_tokens": teacher.forward_features(small)}
    finally:
        torch.set_num_threads(threads)
    torch.save(reference, tmp_path / "reference.pt")
    script = tmp_path / "stock_load.py"
    script.write_text(STOCK_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(export / "teacher_backbone.safetensors"),
                           str(export / "model.json"), str(tmp_path / "reference.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "ssl_vil_imported": False, "tokens_equal": True, "cls_equal": True, "small_equal": True,
        "type": "VisionTransformer", "num_classes": 0}
    # ... and this package's loader gives the same backbone (k-NN / linear evaluation read it this way).
    from ssl_vil.export import load_pretrained_backbone

    for source in (export / "teacher_backbone.safetensors", ref):
        net, loaded_info = load_pretrained_backbone(source)
        with torch.no_grad():
            assert torch.equal(net.forward_features(x), tokens), source
        assert loaded_info["pooling"] == "cls"


def test_eval_features_of_a_vit_use_its_class_token_and_exclude_it_from_the_mean():
    from ssl_vil.eval import features as feats

    vit = _vit().eval()
    layout = token_layout(vit)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = vit.forward_features(x)
        assert feats.cls_pooling_of(vit) == "cls" and feats.cls_pooling_of(vit, {"pooling": "avg"}) == "cls"
        both = feats.pooled_features(tokens, "cls+avg", "cls", layout)
        d = tokens.shape[-1]
        torch.testing.assert_close(both[:, :d], tokens[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(both[:, d:], tokens[:, 1:].mean(1), rtol=0, atol=0)
        # per-block features: the last block's [CLS] and [AVG] are those of forward_features (same final norm)
        cls, avg = feats.block_features(vit, x, 2, "cls")
        assert cls.shape == (3, 2, d)
        torch.testing.assert_close(cls[:, -1], tokens[:, 0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(avg, tokens[:, 1:].mean(1), rtol=1e-6, atol=1e-6)
        assert not torch.equal(cls[:, 0], cls[:, 1])
