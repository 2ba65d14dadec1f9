"""Semantic segmentation: confusion-matrix metrics, sliding-window inference, joint image / mask transforms, layer
decay over backbone + decoder, recipe checks, a digits-seg run end to end and exact resume after SIGKILL."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vil.config import ConfigError
from ssl_vil.infra.files import read_jsonl
from ssl_vil.segment import inference
from ssl_vil.segment.config import SegmentConfig, load_segment_config
from ssl_vil.segment.metrics import ConfusionMatrix
from ssl_vil.segment.model import build_segmenter
from ssl_vil.segment.transforms import SegTrainTransform

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "segment_digits.yaml"
TINY = "{patch_size: 4, dim: 32, depth: 2, mlstm_backend: chunkwise}"


def _tiny(*extra: str) -> list[str]:
    return ["model.name=vil2_tiny_patch16_224", f"model.kwargs={TINY}", "model.decoder_dim=16",
            "model.feature_indices=[0,1]",
            "data.crop_size=32", "data.batch_size=4", "data.num_workers=0", *extra]


# ------------------------------------------------------------------------------------------------ metrics
def test_confusion_matrix_gives_hand_computed_iou_and_ignores_the_ignore_index():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    matrix = ConfusionMatrix(4, ignore_index=255)
    matrix.update(pred, target)
    assert matrix.counts.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    s = matrix.summary(["bg", "a", "b", "never"])
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 1 / (2 + 1 - 1) = 1/2
    ious = [c["iou"] for c in s["per_class"]]
    assert ious[:3] == pytest.approx([100 / 3, 200 / 3, 50.0]) and ious[3] is None
    assert s["miou"] == pytest.approx((100 / 3 + 200 / 3 + 50.0) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 4 / 6) and s["pixels"] == 6
    assert [c["pixels"] for c in s["per_class"]] == [2, 2, 2, 0]
    assert s["macc"] == pytest.approx(100 * (0.5 + 1.0 + 0.5) / 3)


def test_confusion_matrix_refuses_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3, 255).update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- inference
def test_window_starts_cover_the_image_and_end_flush():
    assert inference.window_starts(100, 32, 21) == [0, 21, 42, 63, 68]
    assert inference.window_starts(32, 32, 21) == [0]
    assert inference.window_starts(20, 32, 21) == [0]


def test_slide_inference_of_a_pixelwise_model_equals_whole_image():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 5, kernel_size=1)  # pixel-wise: windows cannot change a pixel's logits
    image = torch.randn(2, 3, 45, 70)
    whole = inference.predict_whole(model, image)
    slide = inference.predict_slide(model, image, window=32, stride=20, num_classes=5)
    assert slide.shape == (2, 5, 45, 70)
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)
    small = inference.predict_slide(model, image[:, :, :20, :25], window=32, stride=20, num_classes=5)
    torch.testing.assert_close(small, whole[:, :, :20, :25], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------- transforms
def test_train_transform_keeps_image_and_mask_aligned_and_pads_with_ignore():
    # Each pixel's colour encodes its mask value, so any misaligned crop / flip shows up.
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 11, size=(24, 40), dtype=np.uint8)
    image = Image.fromarray(np.repeat((mask * 20)[..., None], 3, axis=2), mode="RGB")
    transform = SegTrainTransform(32, [1.0, 1.0], None, hflip=0.5, mean=[0, 0, 0], std=[1, 1, 1], ignore_index=255)
    flips = set()
    for seed in range(12):
        x, y = transform(image, mask, torch.Generator().manual_seed(seed))
        assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
        valid = y != 255
        assert int(valid.sum()) == 24 * 32  # 24 rows of real pixels, the 8 padded rows are ignored
        assert torch.equal(torch.round(x[0][valid] * 255 / 20).long(), y[valid])
        assert bool((x[:, ~valid] == 0).all())  # padding is the mean colour (0 after normalisation)
        flips.add(bool(torch.equal(y[:24], torch.from_numpy(mask[:, :32].astype(np.int64)).flip(-1)))
                  or not bool(torch.equal(y[:24], torch.from_numpy(mask[:, :32].astype(np.int64)))))
    again = transform(image, mask, torch.Generator().manual_seed(3))
    assert torch.equal(again[1], transform(image, mask, torch.Generator().manual_seed(3))[1])


def test_rescale_uses_nearest_for_masks():
    mask = np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4), np.ones((8, 8), dtype=np.uint8))  # 32x32 blocks
    image = Image.fromarray(np.repeat(mask[..., None] * 10, 3, axis=2).astype(np.uint8), mode="RGB")
    transform = SegTrainTransform(64, [2.0, 2.0], None, hflip=0.0, mean=[0, 0, 0], std=[1, 1, 1], ignore_index=255)
    x, y = transform(image, mask, torch.Generator().manual_seed(0))
    assert set(torch.unique(y).tolist()) <= set(range(16))  # no interpolated label values
    assert int((y == 255).sum()) == 0


# ------------------------------------------------------------------------------------------- model, optim
def test_layer_decay_spans_backbone_groups_and_leaves_the_decoder_at_full_lr():
    from ssl_vil.eval.finetune_setup import build_optimizer

    cfg = load_segment_config(None, _tiny("data.train=builtin:digits-seg", "optim.layer_decay=0.5"))
    torch.manual_seed(0)
    model, _ = build_segmenter(cfg, num_classes=11)
    optimizer = build_optimizer(model, cfg, lr=1.0)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    # stem -> 0.5^3, block pair i -> 0.5^(2-i), decoder -> 1 (2 block pairs)
    assert scale[id(named["backbone.patch_embed.proj.weight"])] == 0.5 ** 3
    assert scale[id(named["backbone.blocks.0.0.norm.weight"] if "backbone.blocks.0.0.norm.weight" in named
                    else next(p for n, p in named.items() if n.startswith("backbone.blocks.0.")))] == 0.5 ** 2
    assert scale[id(next(p for n, p in named.items() if n.startswith("backbone.blocks.1.")))] == 0.5
    assert {scale[id(p)] for n, p in named.items() if n.startswith("decoder.")} == {1.0}
    frozen = sorted(n for n, p in named.items() if not p.requires_grad)
    assert frozen == ["backbone.legacy_norm.bias", "backbone.legacy_norm.weight"]  # the pre-head norm: unreached
    assert len(scale) == len(named) - len(frozen)


@pytest.mark.parametrize("decoder", ["linear", "fpn"])
def test_segmenter_gives_input_sized_logits_and_gradients_everywhere(decoder):
    cfg = load_segment_config(None, _tiny("data.train=builtin:digits-seg", f"model.decoder={decoder}",
                                          "model.feature_indices=[0,1]"))
    torch.manual_seed(0)
    model, _ = build_segmenter(cfg, num_classes=7)
    for size in [(32, 32), (48, 64)]:
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 7, *size)
    out.square().mean().backward()
    used = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    # the linear decoder reads the last map only: block 0's output still feeds block 1, so all take part;
    # the middle token and the mask token are absent from this config
    assert used and not missing, missing


@pytest.mark.parametrize("reduction, n_maps, expected", [(16, 4, 32), (16, 2, 32), (8, 3, 16), (4, 2, 8)])
def test_fpn_pyramid_starts_at_stride_4_whatever_the_patch_stride(reduction, n_maps, expected):
    from ssl_vil.segment.decoders import FPNDecoder

    torch.manual_seed(0)
    decoder = FPNDecoder([8] * n_maps, num_classes=3, dim=16, reduction=reduction)
    maps = [torch.randn(2, 8, 8, 8) for _ in range(n_maps)]  # 8 x 8 maps of a 8 * reduction px input
    out = decoder(maps)
    assert out.shape == (2, 3, expected, expected)  # the finest level is at stride 4 px


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.crop_sise.*did you mean data.crop_size"):
        load_segment_config(RECIPE, ["data.crop_sise=64"])
    with pytest.raises(ConfigError, match="model.decoder"):
        load_segment_config(RECIPE, ["model.decoder=upernet"])
    with pytest.raises(ConfigError, match="schedule.warmup_steps"):
        load_segment_config(RECIPE, ["schedule.warmup_steps=400"])
    with pytest.raises(ConfigError, match="data.train"):
        SegmentConfig().validate()


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("segment_*.yaml")), ids=lambda p: p.name)
def test_every_segment_recipe_loads_and_documents_itself(recipe):
    cfg = load_segment_config(recipe, ["model.weights=runs/some_run"])
    header = recipe.read_text().split("\n", 1)[0]
    assert header.startswith("#") and cfg.schedule.train_steps >= 1
    text = recipe.read_text()
    assert "Command" in text and ("Target" in text or "Anchor" in text)


# ---------------------------------------------------------------------------------------------- end to end
def _seg_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "eval/segment.py", "--config", str(RECIPE), "--output-dir", str(out),
            *_tiny("schedule.train_steps=20", "schedule.warmup_steps=2", "train.checkpoint_every_steps=10",
                   "train.eval_every_steps=20", "train.log_every_steps=5", "train.keep_last=5", *extra)]


def test_resume_after_sigkill_continues_exactly(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    done = subprocess.run(_seg_command(ref_dir), env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val mIoU" in done.stdout
    reference = [r for r in read_jsonl(ref_dir / "train_log.jsonl") if "event" not in r]
    assert [r["step"] for r in reference] == list(range(1, 21))
    assert all(math.isfinite(r["loss"]) for r in reference)

    proc = subprocess.Popen(_seg_command(run_dir), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() == "step_00000010":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = [r for r in read_jsonl(run_dir / "train_log.jsonl") if "event" not in r]
    assert 10 <= len(killed) < 20

    done = subprocess.run(_seg_command(run_dir), env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [r for r in read_jsonl(run_dir / "train_log.jsonl") if "event" not in r]
    assert [(r["step"], r["loss"], r["lr"]) for r in resumed] == [(r["step"], r["loss"], r["lr"]) for r in reference]
    ref_eval = [r for r in read_jsonl(ref_dir / "train_log.jsonl") if r.get("event") == "eval"]
    run_eval = [r for r in read_jsonl(run_dir / "train_log.jsonl") if r.get("event") == "eval"]
    assert run_eval == ref_eval and len(ref_eval) == 1
    assert ref_eval[0]["n_val"] == 200 and 0.0 <= ref_eval[0]["miou"] <= 100.0
    assert [c["name"] for c in ref_eval[0]["per_class"]] == ["background", *map(str, range(10))]
    ref_state = torch.load(ref_dir / "checkpoints" / "step_00000020" / "model.pt", weights_only=True)
    run_state = torch.load(run_dir / "checkpoints" / "step_00000020" / "model.pt", weights_only=True)
    assert ref_state.keys() == run_state.keys()
    assert all(torch.equal(ref_state[k], run_state[k]) for k in ref_state)


def test_bad_mask_value_stops_with_one_line_naming_the_key(tmp_path):
    images, masks = tmp_path / "data" / "images", tmp_path / "data" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 30 * i, dtype=np.uint8)).save(images / f"img{i}.png")
        Image.fromarray(np.full((40, 40), 7 if i == 2 else 1, dtype=np.uint8), mode="L").save(masks / f"img{i}.png")
    out = subprocess.run(
        [sys.executable, "eval/segment.py", "--config", str(RECIPE), "--output-dir", str(tmp_path / "out"),
         *_tiny(f"data.train={tmp_path / 'data'}", "data.val=null", "model.num_classes=3", "data.batch_size=4",
                "schedule.train_steps=2", "schedule.warmup_steps=0")],
        cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.strip().splitlines() if line and "INFO" not in line]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "img2" in lines[0] and "[7]" in lines[0] and "model.num_classes" in lines[0]
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").iterdir())
