"""Weight loading: official hub / release formats, safetensors, our SSL checkpoints, resizing, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import ssl_vil.backbones  # noqa: F401  (registers the timm models)
from ssl_vil.backbones import VisionLSTM, WeightLoadError, load_backbone_weights

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vil"
V2 = "vil2_tiny64_bilateral_flatten"
V1 = "vil1_tiny64_bilateral_avg"
TINY = dict(img_size=32, patch_size=4, dim=64, depth=2)


def _load(name: str):
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return _load("input_2x3x32x32.pt")["input"]


@pytest.fixture(scope="module")
def hub_v2() -> dict[str, torch.Tensor]:
    return _load(f"{V2}.state_dict.pt")


def _create(path: Path, num_classes: int = 10, overlay_classes: int | None = 10, name="vil2_tiny_patch16_224", **kw):
    overlay = dict(file=str(path))
    if overlay_classes is not None:
        overlay["num_classes"] = overlay_classes
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                             **{**TINY, "num_classes": num_classes, **kw}).eval()


def _assert_backbone_equal(model, reference, skip=("head.",)):
    for key, value in model.state_dict().items():
        if not key.startswith(skip):
            assert torch.equal(value, reference[key]), key


def test_hub_state_dict_file_and_safetensors(tmp_path, image, hub_v2):
    expected = _load(f"{V2}.outputs.pt")["logits_fp32"]
    torch.save(hub_v2, tmp_path / "hub.pth")
    save_file(hub_v2, str(tmp_path / "hub.safetensors"))
    for file in ("hub.pth", "hub.safetensors"):
        model = _create(tmp_path / file)
        with torch.no_grad():
            torch.testing.assert_close(model(image), expected, atol=1e-5, rtol=0)


def test_ssl_checkpoint_teacher_with_wrappers_and_heads(tmp_path, image, hub_v2):
    """{"teacher": {module.backbone._orig_mod.*, dino/ibot heads}, "student": ...} -> teacher backbone only."""
    backbone = {k: v for k, v in hub_v2.items() if not k.startswith(("head.", "legacy_norm."))}
    teacher = {f"module.backbone._orig_mod.{k}": v for k, v in backbone.items()}
    teacher["module.backbone._orig_mod.mask_token"] = torch.randn(1, 64)
    teacher["module.dino_head.mlp.0.weight"] = torch.randn(256, 128)
    teacher["module.head.last_layer.weight"] = torch.randn(1000, 256)
    teacher["module.center"] = torch.zeros(1, 1000)
    student = {k: v + 1.0 for k, v in teacher.items()}
    path = tmp_path / "ssl.pth"
    torch.save({"teacher": teacher, "student": student, "step": 1234, "config": {"lr": 1e-3}}, path)
    expected_tokens = _load(f"{V2}.outputs.pt")["tokens_final_norm_fp32"]
    for num_classes in (0, 7, 1000):
        model = _create(path, num_classes=num_classes, overlay_classes=None)
        _assert_backbone_equal(model, hub_v2, skip=("head.", "legacy_norm."))
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(image), expected_tokens, atol=1e-5, rtol=0)
        assert "mask_token" not in model.state_dict()
    masked = timm.create_model("vil2_tiny_patch16_224", mask_token=True, num_classes=0, **TINY)
    report = load_backbone_weights(masked, path)
    assert torch.equal(masked.mask_token, teacher["module.backbone._orig_mod.mask_token"])
    assert sorted(report.dropped) == ["center", "dino_head.mlp.0.weight", "head.last_layer.weight"]
    assert report.reinitialized == ["legacy_norm.weight", "legacy_norm.bias"]


def test_flat_objective_state_picks_the_teacher_backbone(hub_v2):
    """Objective state dicts are flat: teacher.backbone.*, student.backbone.*, teacher.dino_head.*, ..."""
    state = {f"teacher.backbone.{k}": v for k, v in hub_v2.items()}
    state |= {f"student.backbone.{k}": v * 2 for k, v in hub_v2.items()}
    state |= {"teacher.dino_head.last_layer.weight": torch.zeros(8, 4), "dino_loss.center": torch.zeros(1, 8)}
    model = timm.create_model("vil2_tiny_patch16_224", num_classes=10, **TINY)
    report = load_backbone_weights(model, state)
    _assert_backbone_equal(model, hub_v2, skip=())
    assert "student.backbone.norm.weight" in report.dropped and "dino_loss.center" in report.dropped
    assert "dino_head.last_layer.weight" in report.dropped and not report.reinitialized


def test_other_num_classes_drops_only_the_classifier(tmp_path, image, hub_v2):
    path = tmp_path / "hub.pth"
    torch.save({"model": hub_v2}, path)
    for num_classes in (0, 3):
        model = _create(path, num_classes=num_classes, overlay_classes=None)
        _assert_backbone_equal(model, hub_v2)  # legacy_norm (pre-logits norm) is kept
        expected_pre_logits = _load(f"{V2}.outputs.pt")["head_input_fp32"]
        with torch.no_grad():
            pre_logits = model.forward_head(model.forward_features(image), pre_logits=True)
        torch.testing.assert_close(pre_logits, expected_pre_logits, atol=1e-5, rtol=0)
        if num_classes:
            assert model.head.weight.shape == (3, 128) and model.head.weight.abs().max() < 1e-3
    model = timm.create_model("vil2_tiny_patch16_224", mask_token=True, num_classes=4, **TINY)
    report = load_backbone_weights(model, hub_v2)
    assert sorted(report.reinitialized) == ["head.bias", "head.weight", "mask_token"]


def test_pos_embed_resized_bicubic_to_the_model_grid(tmp_path, hub_v2):
    path = tmp_path / "hub.pth"
    torch.save(hub_v2, path)
    model = _create(path, img_size=(48, 40))
    source = hub_v2["pos_embed.embed"].permute(0, 3, 1, 2)
    expected = F.interpolate(source, size=(12, 10), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert model.pos_embed.embed.shape == (1, 12, 10, 64)
    torch.testing.assert_close(model.pos_embed.embed.data, expected, atol=0, rtol=0)
    _assert_backbone_equal(model, hub_v2, skip=("head.", "pos_embed."))


def test_v1_release_format_via_load_backbone_weights(tmp_path, image):
    """v1 training-code keys built from the spec's renaming table load and reproduce the v1 fixture."""
    hub = _load(f"{V1}.state_dict.pt")
    raw = {}
    for key, value in hub.items():
        if key.startswith("blocks."):
            _, index, part, rest = key.split(".", 3)
            raw[f"xlstm.blocks.{index}." + ("xlstm_norm." if part == "norm" else "xlstm.") + rest] = value
        elif key.startswith("legacy_norm."):
            raw["xlstm.post_blocks_norm." + key.split(".", 1)[1]] = value
        elif key.startswith("norm."):
            raw["head.0." + key.split(".", 1)[1]] = value
        else:
            raw[key.replace("head.", "head.1.")] = value
    assert "xlstm.blocks.1.xlstm.conv1d.conv.weight" in raw
    path = tmp_path / "vil1_raw.th"
    torch.save({"state_dict": raw}, path)
    model = VisionLSTM(**TINY, num_classes=10, legacy_norm=True).eval()
    load_backbone_weights(model, path)
    _assert_backbone_equal(model, hub, skip=())
    with torch.no_grad():
        torch.testing.assert_close(model(image), _load(f"{V1}.outputs.pt")["logits_fp32"], atol=1e-5, rtol=0)


def test_mismatching_checkpoints_raise_listing_keys(tmp_path, hub_v2):
    path = tmp_path / "hub.pth"
    torch.save(hub_v2, path)
    with pytest.raises(WeightLoadError) as info:
        _create(path, dim=32)
    assert "patch_embed.proj.weight: checkpoint (64, 3, 4, 4) vs model (32, 3, 4, 4)" in str(info.value)
    broken = dict(hub_v2)
    del broken["blocks.1.rowwise_from_bot_right.layer.conv.bias"]
    broken["blocks.7.rowwise_from_top_left.norm.weight"] = torch.zeros(64)
    model = timm.create_model("vil2_tiny_patch16_224", num_classes=10, **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightLoadError) as info:
        load_backbone_weights(model, broken)
    message = str(info.value)
    assert "missing (1): blocks.1.rowwise_from_bot_right.layer.conv.bias (128,)" in message
    assert "unexpected (1): blocks.7.rowwise_from_top_left.norm.weight (64,)" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    with pytest.raises(WeightLoadError, match="depth=3"):
        load_backbone_weights(timm.create_model("vil2_tiny_patch16_224", **{**TINY, "depth": 3}), hub_v2)
    with pytest.raises(WeightLoadError, match="none of"):
        load_backbone_weights(model, {"ema": {"a": torch.zeros(1)}, "opt": {"b": torch.zeros(1)}})
    with pytest.raises(FileNotFoundError, match="not found"):
        load_backbone_weights(model, tmp_path / "nope.pth")
    v1 = VisionLSTM(**TINY, num_classes=10, legacy_norm=True)
    with pytest.raises(WeightLoadError, match="unexpected"):
        load_backbone_weights(v1, hub_v2)


def test_raw_key_map_fixture_is_reproduced_by_renaming():
    from ssl_vil.backbones.weights import rename_training_code_keys

    raw_to_hub = json.loads((FIXTURES / "vil2_tiny64_raw_checkpoint_keys.json").read_text())
    renamed = rename_training_code_keys({k: torch.zeros(1) for k in raw_to_hub}, version=2)
    assert list(renamed) == list(raw_to_hub.values())
