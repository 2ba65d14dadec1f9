"""The export describes itself: a 64 px ViL2 pretrained with recipes/small_natural_dino.yaml (2 steps on synthetic
shards), exported by the CLI, loads in a fresh process with one timm call as the teacher it was (bitwise) and with
the run's data config (64 px, the run's mean / std)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer_harness import final_payload, write_shards

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "small_natural_dino.yaml"
ARCH = "vil2_tiny_patch16_224"
SHAPE = dict(img_size=64, patch_size=8, dim=64, depth=2)
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.2, 0.3]

# The recipe as written, shrunk to a few seconds on a CPU: a tiny backbone and head, 2 steps of batch 8.
SMALL_RUN = [
    "model.dim=64", "model.depth=2", "objective.dino_head.out_dim=256", "objective.dino_head.hidden_dim=64",
    "objective.dino_head.bottleneck_dim=32", "optim.global_batch_size=8", "data.num_workers=0",
    "data.shuffle_window_samples=8", "data.samples_per_epoch=null", "schedule.total_epochs=null",
    "schedule.total_steps=2", "schedule.warmup_epochs=null", "schedule.warmup_steps=1",
    "schedule.teacher_temp_warmup_epochs=null", "schedule.teacher_temp_warmup_steps=1",
    "schedule.freeze_last_layer_epochs=null", "schedule.freeze_last_layer_steps=1", "checkpoint.every_steps=2",
    "logging.tensorboard=false", f"data.augment.mean={MEAN}", f"data.augment.std={STD}",
]

# Runs in a fresh interpreter: only timm and ssl_vil, one call to build the model from the file.
LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch, timm, ssl_vil
    from PIL import Image

    torch.set_num_threads(1)
    weights, reference = sys.argv[1], torch.load(sys.argv[2])
    model = timm.create_model("%s", pretrained=True, pretrained_cfg_overlay=dict(file=weights)).eval()
    data_cfg = timm.data.resolve_model_data_config(model)
    image = Image.fromarray((np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8))
    pixels = timm.data.create_transform(**data_cfg)(image)
    with torch.no_grad():
        pooled, tokens = model(reference["x"]), model.forward_features(reference["x"])
        from_transform = model.forward_features(pixels[None])
    print(json.dumps({
        "pooled_equal": torch.equal(pooled, reference["pooled"]),
        "tokens_equal": torch.equal(tokens, reference["tokens"]),
        "input_size": list(data_cfg["input_size"]), "mean": list(data_cfg["mean"]), "std": list(data_cfg["std"]),
        "interpolation": data_cfg["interpolation"], "crop_pct": data_cfg["crop_pct"],
        "num_classes": model.num_classes, "pixels": list(pixels.shape), "tokens": list(from_transform.shape),
    }))
""" % ARCH)


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def _run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory) -> Path:
    """A 2-step run of the small natural-image recipe on 64 px synthetic shards, exported with the CLI."""
    root = tmp_path_factory.mktemp("export_timm")
    write_shards(root / "shards", n_shards=2, per_shard=8, size=64)
    run = root / "run"
    _run(["-m", "ssl_vil.train", "--config", str(RECIPE), "--output-dir", str(run),
          f"data.train={root / 'shards'}", *SMALL_RUN])
    proc = _run(["-m", "ssl_vil.export", str(run)])
    assert "teacher_backbone.safetensors" in proc.stdout
    return run


def _teacher(run: Path) -> torch.nn.Module:
    """The run's teacher backbone, built from the known shape and the checkpoint's tensors (not via the export)."""
    import timm

    import ssl_vil  # noqa: F401

    prefix = "teacher.backbone."
    state = {k[len(prefix):]: v for k, v in final_payload(run)["objective"].items() if k.startswith(prefix)}
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **SHAPE)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_recipe_ran_two_steps_with_the_dino_preset(exported_run: Path):
    import yaml

    augment = yaml.safe_load((exported_run / "config.yaml").read_text())["data"]["augment"]
    assert augment == {"preset": "dino", "global_size": 64, "local_size": 24, "n_global": 2, "n_local": 8,
                       "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4], "blur": "dino", "mean": MEAN,
                       "std": STD}
    steps = [json.loads(line).get("step") for line in (exported_run / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 2


def test_one_timm_call_gives_the_teacher_and_its_data_config(exported_run: Path, tmp_path: Path):
    weights = exported_run / "export" / "teacher_backbone.safetensors"
    teacher = _teacher(exported_run)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loading process runs one thread too: same kernels, bitwise comparable
    try:
        with torch.no_grad():
            reference = {"x": x, "pooled": teacher(x), "tokens": teacher.forward_features(x)}
    finally:
        torch.set_num_threads(threads)
    torch.save(reference, tmp_path / "reference.pt")
    # Only the file: model.json is not next to it.
    alone = tmp_path / "alone" / "teacher.safetensors"
    alone.parent.mkdir()
    shutil.copy(weights, alone)
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    out = json.loads(_run([str(script), str(alone), str(tmp_path / "reference.pt")], cwd=tmp_path).stdout)
    assert out == {"pooled_equal": True, "tokens_equal": True, "input_size": [3, 64, 64], "mean": MEAN, "std": STD,
                   "interpolation": "bicubic", "crop_pct": 0.875, "num_classes": 0, "pixels": [3, 64, 64],
                   "tokens": [1, 64, 64]}  # 8 x 8 tokens of width 64


def test_metadata_and_model_json_describe_the_backbone(exported_run: Path):
    from safetensors import safe_open

    with safe_open(str(exported_run / "export" / "teacher_backbone.safetensors"), framework="pt") as f:
        meta = f.metadata()
    kwargs = {**SHAPE, "mlstm_backend": "auto"}
    as_json = ("model_kwargs", "input_size", "mean", "std", "crop_pct")
    assert {k: json.loads(v) if k in as_json else v for k, v in meta.items()} == {
        "format": "ssl_vil.backbone", "architecture": ARCH, "interpolation": "bicubic", "model_kwargs": kwargs,
        "input_size": [3, 64, 64], "mean": MEAN, "std": STD, "crop_pct": 0.875, "source": "step_00000002",
        "pooling": "bilateral_concat"}
    info = json.loads((exported_run / "export" / "model.json").read_text())
    assert info == {"architecture": ARCH, "model_kwargs": kwargs, "input_size": [3, 64, 64], "mean": MEAN,
                    "std": STD, "crop_pct": 0.875, "interpolation": "bicubic", "pooling": "bilateral_concat",
                    "model": ARCH, "kwargs": kwargs, "img_size": 64, "step": 2}


def test_loading_the_file_alone_for_evaluation(exported_run: Path, tmp_path: Path):
    from ssl_vil.export import load_pretrained_backbone

    alone = tmp_path / "teacher.safetensors"
    shutil.copy(exported_run / "export" / "teacher_backbone.safetensors", alone)
    model, info = load_pretrained_backbone(alone)
    assert (info["model"], info["kwargs"], info["img_size"], info["mean"], info["std"]) == (
        ARCH, {**SHAPE, "mlstm_backend": "auto"}, 64, MEAN, STD)
    teacher = _teacher(exported_run)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values()))


def test_contradicting_kwargs_and_unfitting_files_name_the_keys(exported_run: Path, tmp_path: Path):
    import timm
    from safetensors.torch import load_file, save_file

    from ssl_vil.backbones import WeightLoadError

    weights = exported_run / "export" / "teacher_backbone.safetensors"
    with pytest.raises(WeightLoadError) as info:
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), dim=192, depth=2)
    assert str(info.value) == (f"{weights}: the arguments dim=192 (the file was trained with dim=64) contradict "
                               f"the exported {ARCH}; leave them out: the file supplies them")
    with pytest.raises(WeightLoadError, match=f"holds a {ARCH} backbone; load it with timm.create_model"):
        timm.create_model("vil_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    # Another resolution is allowed: the position embedding is resized and the data config follows.
    resized = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), img_size=96,
                                num_classes=10)
    assert timm.data.resolve_model_data_config(resized)["input_size"] == (3, 96, 96)
    assert resized.num_classes == 10
    # Without the description, the registered shape does not fit; the message says what the file holds.
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(weights)), str(bare))
    with pytest.raises(WeightLoadError) as info:
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(bare)))
    first = str(info.value).splitlines()
    assert first[0] == ("checkpoint does not fit VisionLSTM2 (dim=192, depth=12); the checkpoint is dim=64, "
                        "depth=2, patch_size=8:")
    assert "blocks.0.rowwise_from_top_left.layer.proj_down.weight: checkpoint (64, 128) vs model (192, 384)" in first[2]
