"""ViL block designs (v2): every design trains and runs both mLSTM backends; traversal orders are pinned; the default
``alternating`` is the pre-existing model bit for bit; configs, exports and the cost command know the designs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import ssl_vil.backbones  # noqa: F401  (registers the timm models)
from ssl_vil.backbones import VisionLSTM2, WeightLoadError
from ssl_vil.backbones.designs import BLOCK_DESIGNS, TRAVERSALS, design_costs, main as designs_main, pair_layout
from ssl_vil.backbones.vil_block import ViLBlock, ViLBlockPair
from ssl_vil.backbones.vil_layer import ViLLayer
from ssl_vil.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
# Tiny v2 model at 128 px: an 8 x 8 grid of 64 tokens.
TINY = dict(img_size=128, patch_size=16, dim=32, depth=2, num_classes=5)
BASE = ["schedule.total_steps=100", "optim.global_batch_size=64"]


def _tiny(design: str, **kwargs) -> VisionLSTM2:
    return timm.create_model("vil2_tiny_patch16_224", **{**TINY, "block_design": design, **kwargs})


def _perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Add noise to every parameter so that zero-initialised gates, norms and biases all matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return module


def _block(design: str, dim: int = 16) -> ViLBlock:
    """The first sub-block of a ``design`` pair, fp64, with perturbed parameters (parallel backend)."""
    torch.manual_seed(0)
    pair = ViLBlockPair(dim, design=design, bias=True, conv_kind="2d", backend="parallel")
    return _perturb_(pair.sub_blocks[0].double())


def _tokens(grid: tuple[int, int], dim: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, grid[0] * grid[1], dim, generator=generator, dtype=torch.float64)


def _reverse(x: torch.Tensor) -> torch.Tensor:
    """Reverse the patch sequence (B, S, C): the grid rotated by 180 degrees, same grid shape."""
    return x.flip(dims=[1])


def _transpose(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h * w, C) row-major tokens of an (h, w) grid -> row-major tokens of the transposed (w, h) grid."""
    batch, _, channels = x.shape
    return x.reshape(batch, grid[0], grid[1], channels).transpose(1, 2).reshape(batch, -1, channels)


def _copy_first_direction_into_branches_(layer: ViLLayer) -> None:
    """Give every extra direction of a separate-parameter layer the first direction's branch parameters."""
    own = {name: value for name, value in layer.state_dict().items() if not name.startswith("branches.")}
    with torch.no_grad():
        for branch in layer.branches.values():
            for name, value in branch.state_dict().items():  # the same names as the layer's own branch
                value.copy_(own[name])


# ------------------------------------------------------------------------------------------ structure, costs
def test_layouts_and_parameter_counts():
    assert BLOCK_DESIGNS[0] == "alternating" and set(BLOCK_DESIGNS) >= {"uni", "bi", "bi_shared", "quad"}
    first, second = pair_layout("alternating")
    assert (first.name, first.directions, second.name, second.directions) == (
        "rowwise_from_top_left", ("row_fwd",), "rowwise_from_bot_right", ("row_bwd",))
    assert pair_layout("quad")[0].directions == TRAVERSALS and not pair_layout("quad")[0].share_directions
    assert pair_layout("quad_shared")[1].share_directions and pair_layout("bi_shared")[0].share_directions
    with pytest.raises(ValueError, match="block_design must be one of alternating, uni"):
        pair_layout("diagonal")
    with torch.device("meta"):
        counts = {d: sum(p.numel() for p in _tiny(d).parameters()) for d in BLOCK_DESIGNS}
        quad_keys = set(_tiny("quad").state_dict())
    # Shared parameters cost nothing; each separate extra direction adds conv + q/k/v + cell + skip per sub-block.
    assert counts["alternating"] == counts["uni"] == counts["bi_shared"] == counts["quad_shared"]
    inner = 2 * TINY["dim"]
    per_direction = (inner * 9 + inner) + 3 * (inner * 4 + inner) + 2 * (3 * inner * 4 + 4) + 2 * inner + inner
    sub_blocks = 2 * TINY["depth"]
    assert counts["bi"] - counts["alternating"] == sub_blocks * per_direction
    assert counts["quad"] - counts["alternating"] == 3 * sub_blocks * per_direction
    assert {"blocks.0.first.layer.branches.col_bwd.conv.weight",
            "blocks.1.second.layer.branches.row_bwd.mlstm_cell.igate.weight"} <= quad_keys
    with pytest.raises(ValueError, match="block_design must be one of"):
        _tiny("diagonal")


def test_design_costs_and_cli(capsys):
    rows = {row["design"]: row for row in design_costs("vil2_tiny_patch16_224", 64)}
    assert list(rows) == list(BLOCK_DESIGNS)
    # The spec's 6,391,528 at 224 px less the 1000-class head and the position embedding of 14x14 - 4x4 tokens.
    assert rows["alternating"]["params"] == 6_391_528 - (192 * 1000 * 2 + 1000) - (196 - 16) * 192
    # Every sub-block's cell and branch run once per direction: bi ~ 2x, quad ~ 4x the mixer FLOPs.
    assert rows["alternating"]["gflops"] == rows["uni"]["gflops"] > 0
    assert rows["bi"]["gflops"] == rows["bi_shared"]["gflops"] > rows["alternating"]["gflops"]
    assert rows["quad"]["gflops"] == rows["quad_shared"]["gflops"] > rows["bi"]["gflops"]
    assert designs_main(["--img-size", "64", "--design", "uni", "--design", "quad"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[2:]] == ["uni", "quad"]
    with pytest.raises(SystemExit) as exit_info:
        designs_main(["--model", "vil_tiny_patch16_224"])
    assert exit_info.value.code == 2


def test_cli_help_imports_no_torch():
    probe = ("import runpy, sys; sys.argv = ['designs', '--help']\n"
             "try:\n    runpy.run_module('ssl_vil.backbones.designs', run_name='__main__', alter_sys=True)\n"
             "except SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--img-size" in proc.stdout and "HEAVY []" in proc.stdout


# ---------------------------------------------------------------------------------- training, mLSTM backends
@pytest.mark.parametrize("design", BLOCK_DESIGNS)
def test_forward_backward_gives_every_parameter_a_finite_gradient(design):
    torch.manual_seed(0)
    model = _tiny(design, mask_token=True, drop_path_rate=0.1).train()
    image = torch.randn(2, 3, 128, 128)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 2:5, 3:6] = True
    logits = model(image, masks=masks)
    assert logits.shape == (2, 5)
    logits.square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, name


@pytest.mark.parametrize("design", BLOCK_DESIGNS)
def test_chunkwise_backend_equals_parallel(design):
    torch.manual_seed(0)
    model = _perturb_(_tiny(design, depth=1, num_classes=0), scale=0.05).double().eval()
    image = torch.randn(2, 3, 128, 112, dtype=torch.float64, requires_grad=True)  # 8 x 7 grid: non-square
    model.set_mlstm_backend("parallel")
    parallel = model.forward_features(image)
    (parallel_grad,) = torch.autograd.grad(parallel.square().sum(), image)
    model.set_mlstm_backend("chunkwise", chunk_size=16)  # 56 tokens: 4 chunks of 14
    cells = [m for m in model.modules() if type(m).__name__ == "MLSTMCell"]
    assert cells and all(cell.backend == "chunkwise" and cell.chunk_size == 16 for cell in cells)
    chunkwise = model.forward_features(image)
    (chunkwise_grad,) = torch.autograd.grad(chunkwise.square().sum(), image)
    torch.testing.assert_close(chunkwise, parallel, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(chunkwise_grad, parallel_grad, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------------- traversal pins
def test_uni_block_is_not_equivariant_to_reversing_the_sequence():
    block, grid = _block("uni"), (6, 5)
    x = _tokens(grid)
    out, out_of_reversed = block(x, grid), block(_reverse(x), grid)
    assert (out_of_reversed - out).abs().max() > 1e-3  # the order matters ...
    assert (out_of_reversed - _reverse(out)).abs().max() > 1e-3  # ... and it is not a mere relabelling


def test_bi_shared_block_is_equivariant_to_reversing_the_sequence():
    block, grid = _block("bi_shared"), (6, 5)
    x = _tokens(grid)
    assert (block(x, grid) - x).abs().max() > 1e-3
    torch.testing.assert_close(block(_reverse(x), grid), _reverse(block(x, grid)), rtol=1e-12, atol=1e-12)


def test_bi_block_is_equivariant_only_with_its_forward_parameters_copied_backward():
    block, grid = _block("bi"), (6, 5)
    x = _tokens(grid)
    assert (block(_reverse(x), grid) - _reverse(block(x, grid))).abs().max() > 1e-3
    _copy_first_direction_into_branches_(block.layer)
    torch.testing.assert_close(block(_reverse(x), grid), _reverse(block(x, grid)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("design", ("quad_shared", "quad"))
def test_quad_block_commutes_with_transposing_the_grid_when_directions_share_parameters(design):
    block, grid = _block(design), (6, 5)  # non-square: the transposed grid is (5, 6)
    transposed_grid = (grid[1], grid[0])
    x = _tokens(grid)
    if design == "quad":  # separate parameters: rows and columns see different weights ...
        gap = block(_transpose(x, grid), transposed_grid) - _transpose(block(x, grid), grid)
        assert gap.abs().max() > 1e-3
        _copy_first_direction_into_branches_(block.layer)  # ... until they are the same weights
    torch.testing.assert_close(block(_transpose(x, grid), transposed_grid), _transpose(block(x, grid), grid),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block(_reverse(x), grid), _reverse(block(x, grid)), rtol=1e-12, atol=1e-12)


# Token p = (4, 2) of an 8 x 8 grid is perturbed. Probes A = (7, 0), B = (0, 6), C = (6, 3) are outside its 3x3 conv
# neighbourhood; a traversal reaches a probe iff the probe comes after p (and after p's conv neighbours) in its order:
# row-major indices p 34 (neighbours 25..43), A 56, B 6, C 51; column-major p 20 (neighbours 11..29), A 7, B 48, C 30.
REACHED = {"row_fwd": (True, False, True), "row_bwd": (False, True, False),
           "col_fwd": (False, True, True), "col_bwd": (True, False, False)}


@pytest.mark.parametrize("direction", TRAVERSALS)
def test_each_traversal_reaches_exactly_the_tokens_after_it(direction):
    torch.manual_seed(0)
    layer = _perturb_(ViLLayer(16, directions=(direction,), backend="parallel").double())
    grid = (8, 8)
    x = _tokens(grid)
    moved = x.clone()
    moved[:, 4 * 8 + 2] += 1.0
    change = (layer(moved, grid) - layer(x, grid)).abs().amax(dim=(0, 2))
    for (row, col), reached in zip(((7, 0), (0, 6), (6, 3)), REACHED[direction]):
        if reached:
            assert change[row * 8 + col] > 1e-6, (direction, row, col)
        else:
            assert change[row * 8 + col] < 1e-12, (direction, row, col)


def test_quad_layer_is_the_sum_of_its_four_traversals():
    """quad = rows both ways + columns both ways, each with its own parameters, recomputed here with explicit
    index permutations (not the layer's own traversal code)."""
    torch.manual_seed(0)
    quad = _perturb_(ViLLayer(16, directions=TRAVERSALS, backend="parallel").double())
    grid = (4, 6)
    x = _tokens(grid)
    row_major = torch.arange(24)
    column_major = row_major.reshape(4, 6).t().flatten()
    orders = {"row_fwd": (row_major, grid), "row_bwd": (row_major.flip(0), grid),
              "col_fwd": (column_major, (6, 4)), "col_bwd": (column_major.flip(0), (6, 4))}
    shared = {k: v for k, v in quad.state_dict().items() if k.startswith(("proj_up.", "proj_down."))}
    expected = torch.zeros_like(x)
    for direction, (order, seen_grid) in orders.items():
        single = ViLLayer(16, backend="parallel").double()
        parts = quad.branch_parts(direction).state_dict()
        single.load_state_dict({**shared, **{k: v for k, v in parts.items() if not k.startswith("branches.")}})
        expected[:, order] += single(x[:, order], seen_grid)
    expected -= 3 * quad.proj_down.bias  # proj_down's bias once, not four times
    torch.testing.assert_close(quad(x, grid), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------- alternating = the old model
def test_explicit_alternating_is_the_default_model_bit_for_bit():
    outputs, states = [], []
    for kwargs in ({}, {"block_design": "alternating"}):
        torch.manual_seed(3)
        model = timm.create_model("vil2_tiny_patch16_224", img_size=64, patch_size=8, dim=32, depth=2,
                                  num_classes=4, **kwargs).eval()
        assert model.block_design == "alternating"
        torch.manual_seed(4)
        outputs.append(model(torch.randn(2, 3, 64, 64)))
        states.append(model.state_dict())
    assert list(states[0]) == list(states[1])
    assert all(name.split(".")[2] in ("rowwise_from_top_left", "rowwise_from_bot_right")
               for name in states[0] if name.startswith("blocks."))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.equal(outputs[0], outputs[1])
    # A single reversed traversal is the official flipped sub-block.
    torch.manual_seed(5)
    flipped = ViLLayer(16, flip=True)
    torch.manual_seed(5)
    reversed_rows = ViLLayer(16, directions=("row_bwd",))
    x = torch.randn(2, 12, 16)
    assert reversed_rows.flip and torch.equal(flipped(x, (3, 4)), reversed_rows(x, (3, 4)))
    with pytest.raises(ValueError, match="either flip=True or directions"):
        ViLLayer(16, flip=True, directions=("row_fwd",))


# ------------------------------------------------------------------------------------------ config and export
def test_config_accepts_designs_for_v2_models_only():
    from ssl_vil.export import backbone_kwargs

    default = load_config(None, BASE, world_size=1)
    assert default.model.block_design == "alternating" and "block_design" not in backbone_kwargs(default)
    quad = load_config(None, [*BASE, "model.block_design=quad"], world_size=1)
    assert quad.model.block_design == "quad" and backbone_kwargs(quad)["block_design"] == "quad"
    with pytest.raises(ConfigError) as error:
        load_config(None, [*BASE, "model.block_design=diagonal"], world_size=1)
    message = str(error.value)
    assert "model.block_design" in message and "'diagonal'" in message
    assert all(design in message for design in BLOCK_DESIGNS)
    with pytest.raises(ConfigError, match=r"model\.block_design.*v2 ViL models"):
        load_config(None, [*BASE, "model.name=vil_tiny_patch16_224", "model.block_design=bi"], world_size=1)


def _export(cfg, model: torch.nn.Module, path: Path) -> Path:
    """Write ``model``'s backbone weights with the header ``python -m ssl_vil.export`` gives run ``cfg``."""
    from safetensors.torch import save_file

    from ssl_vil.backbones.weights import export_metadata
    from ssl_vil.export import model_info

    info = model_info(cfg)
    metadata = export_metadata(info["architecture"], info["model_kwargs"], input_size=tuple(info["input_size"]),
                               mean=tuple(info["mean"]), std=tuple(info["std"]), crop_pct=info["crop_pct"],
                               interpolation=info["interpolation"], pooling=info["pooling"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


def test_export_of_a_quad_model_reloads_as_quad(tmp_path: Path):
    overrides = [*BASE, "model.name=vil2_tiny_patch16_224", "model.dim=32", "model.depth=1", "model.patch_size=8",
                 "data.augment.global_size=32", "data.augment.local_size=16"]
    cfg = load_config(None, [*overrides, "model.block_design=quad"], world_size=1)
    torch.manual_seed(0)
    model = _perturb_(_tiny("quad", img_size=32, patch_size=8, depth=1, num_classes=0)).eval()
    weights = _export(cfg, model, tmp_path / "quad.safetensors")
    from ssl_vil.backbones.weights import read_export_metadata

    assert read_export_metadata(weights)["model_kwargs"]["block_design"] == "quad"
    loaded = timm.create_model(cfg.model.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights))).eval()
    assert loaded.block_design == "quad"
    image = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(image), model(image))
    with pytest.raises(WeightLoadError, match=r"block_design='alternating' \(the file was trained with "
                                              r"block_design='quad'\)"):
        timm.create_model(cfg.model.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                          block_design="alternating")
    # An alternating export states no design (files written before designs existed look the same) ...
    plain_cfg = load_config(None, overrides, world_size=1)
    from ssl_vil.export import model_info

    assert "block_design" not in json.loads(json.dumps(model_info(plain_cfg)))["model_kwargs"]
    plain = _export(plain_cfg, _tiny("alternating", img_size=32, patch_size=8, depth=1, num_classes=0),
                    tmp_path / "plain.safetensors")
    # ... and so holds the default design: asking for another one is a contradiction, not a key mismatch.
    with pytest.raises(WeightLoadError, match=r"block_design='bi'.*block_design='alternating'"):
        timm.create_model(cfg.model.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(plain)),
                          block_design="bi")
