"""Parity of our ViL implementation with the official-code fixtures (tests/fixtures/vil, spec section 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from ssl_vil.backbones import VisionLSTM, VisionLSTM2, mlstm_chunkwise, mlstm_parallel

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vil"
FIXTURE_NAMES = ("vil2_tiny64_bilateral_flatten", "vil2_tiny64_bilateral_avg", "vil1_tiny64_bilateral_avg")
BACKENDS = ("parallel", "chunkwise")


def _load(name: str):
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


def fixture_state_dict(name: str) -> dict[str, torch.Tensor]:
    state_dict = _load(f"{name}.state_dict.pt")
    if name == "vil2_tiny64_bilateral_avg":  # stored as a delta on top of the flatten variant (README)
        base = _load("vil2_tiny64_bilateral_flatten.state_dict.pt")
        base = {k: v for k, v in base.items() if not k.startswith(("legacy_norm.", "head."))}
        state_dict = {**base, **state_dict}
    return state_dict


def build_fixture_model(name: str, backend: str, chunk_size: int = 16) -> VisionLSTM | VisionLSTM2:
    spec = json.loads((FIXTURES / f"{name}.kwargs.json").read_text())
    kwargs = spec["kwargs"]
    cls = {"vision_lstm.VisionLSTM2": VisionLSTM2, "vision_lstm.VisionLSTM": VisionLSTM}[spec["ctor"]]
    model = cls(
        img_size=tuple(kwargs["input_shape"][1:]),
        patch_size=kwargs["patch_size"],
        dim=kwargs["dim"],
        depth=kwargs["depth"],
        num_classes=kwargs["output_shape"][0],
        pooling=kwargs["pooling"],
        legacy_norm=kwargs["legacy_norm"],
        mlstm_backend=backend,
        mlstm_chunk_size=chunk_size,
    )
    model.load_state_dict(fixture_state_dict(name), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return _load("input_2x3x32x32.pt")["input"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_state_dict_keys_and_shapes_match_official_order(name):
    model = build_fixture_model(name, "parallel")
    reference = fixture_state_dict(name)
    ours = model.state_dict()
    assert list(ours) == list(reference)
    assert all(ours[k].shape == reference[k].shape for k in reference)
    summary = json.loads((FIXTURES / "summary.json").read_text())[name]
    assert sum(p.numel() for p in model.parameters()) == summary["num_params"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fp32_outputs_match_official(name, backend, image):
    torch.set_num_threads(1)
    expected = _load(f"{name}.outputs.pt")
    model = build_fixture_model(name, backend)
    with torch.no_grad():
        tokens = model.forward_features(image)
        head_input = model.forward_head(tokens, pre_logits=True)
        logits = model.forward_head(tokens)
        final, blocks = model.forward_intermediates(image, output_fmt="NLC")
    torch.testing.assert_close(logits, expected["logits_fp32"], atol=1e-5, rtol=0)
    torch.testing.assert_close(head_input, expected["head_input_fp32"], atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, expected["tokens_final_norm_fp32"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(blocks), expected["block_outputs_fp32"], atol=1e-5, rtol=0)
    torch.testing.assert_close(final, tokens, atol=0, rtol=0)
    torch.testing.assert_close(model(image), logits, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fp64_outputs_match_official(name, backend, image):
    torch.set_num_threads(1)
    expected = _load(f"{name}.outputs.pt")
    model = build_fixture_model(name, backend).double()
    with torch.no_grad():
        tokens = model.forward_features(image.double())
        head_input = model.forward_head(tokens, pre_logits=True)
        logits = model.forward_head(tokens)
    torch.testing.assert_close(logits, expected["logits_fp64"], atol=2e-6, rtol=0)
    torch.testing.assert_close(head_input, expected["head_input_fp64"], atol=2e-6, rtol=0)


def test_mlstm_cell_fixture():
    cell = _load("mlstm_cell_parallel.pt")
    args = [cell["q"], cell["k"], cell["v"], cell["igate_preact"].squeeze(-1), cell["fgate_preact"].squeeze(-1)]
    torch.testing.assert_close(mlstm_parallel(*args), cell["h_fp32"], atol=1e-5, rtol=0)
    for chunk_size in (3, 5, 16, 64):
        torch.testing.assert_close(mlstm_chunkwise(*args, chunk_size=chunk_size), cell["h_fp32"], atol=2e-5, rtol=0)
    args64 = [a.double() for a in args]
    torch.testing.assert_close(mlstm_parallel(*args64), cell["h_fp64"], atol=1e-12, rtol=0)
    for chunk_size in (3, 5, 16, 64):
        torch.testing.assert_close(mlstm_chunkwise(*args64, chunk_size=chunk_size), cell["h_fp64"], atol=1e-12, rtol=0)


def test_raw_training_checkpoint_loads_through_timm(tmp_path, image):
    """An official release-format file ({"state_dict": training-code keys}) loads via timm's pretrained path."""
    import ssl_vil.backbones  # noqa: F401  (registers the models)

    name = "vil2_tiny64_bilateral_flatten"
    hub = fixture_state_dict(name)
    raw_to_hub = json.loads((FIXTURES / "vil2_tiny64_raw_checkpoint_keys.json").read_text())
    assert sorted(raw_to_hub.values()) == sorted(hub)
    raw = {raw_key: hub[hub_key] for raw_key, hub_key in raw_to_hub.items()}
    assert any(k.startswith("xlstm.blocks.") for k in raw)
    path = tmp_path / "vil2_tiny64_raw.th"
    torch.save({"state_dict": raw, "epoch": 800}, path)
    model = timm.create_model(
        "vil2_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        img_size=32,
        patch_size=4,
        dim=64,
        depth=2,
        num_classes=10,
    ).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, hub[key]), key
    expected = _load(f"{name}.outputs.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(image), expected["logits_fp32"], atol=1e-5, rtol=0)
