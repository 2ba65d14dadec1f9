"""Config schema: bad configs fail at load with the key, the value and what was expected; recipes resolve."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ssl_vil.config import ConfigError, diff_configs, load_config, to_yaml
from recipe_snapshots import SNAPSHOTS, pretraining_recipes, resolved_text

BASE = ["schedule.total_steps=100", "optim.global_batch_size=64"]

# (overrides, world_size, substrings the message must contain: dotted key, bad value, expectation)
BAD = [
    (["optim.lrr=1e-3"], 1, ["optim.lrr", "did you mean optim.lr"]),
    (["optim.lr_scalin=linear"], 1, ["optim.lr_scalin", "did you mean optim.lr_scaling"]),
    (["objective.dino_head.out_dimm=10"], 1, ["objective.dino_head.out_dimm", "did you mean objective.dino_head.out_dim"]),
    (["data.augment.n_locals=4"], 1, ["data.augment.n_locals", "did you mean data.augment.n_local"]),
    (["modle.name=vil2_tiny_patch16_224"], 1, ["modle", "did you mean model"]),
    (["optim.lr=fast"], 1, ["optim.lr", "'fast'", "expected float"]),
    (["optim.global_batch_size=sixty"], 1, ["optim.global_batch_size", "'sixty'", "expected int"]),
    (["train.deterministic=maybe"], 1, ["train.deterministic", "'maybe'", "bool"]),
    (["data.augment.global_scale=[0.3]"], 1, ["data.augment.global_scale", "[0.3]", "a list of 2 float"]),
    (["schedule.total_epochs=10", "data.samples_per_epoch=640"], 1,
     ["schedule.total_*", "total_steps=100", "total_epochs=10", "exactly one of"]),
    (["schedule.warmup_steps=500"], 1, ["schedule.warmup_steps", "500", "at most the run length (100 steps; this is 500 steps): shorten it too, e.g. schedule.warmup_steps=10"]),
    (["optim.grad_accum_steps=3"], 2, ["optim.global_batch_size", "64", "world_size × optim.grad_accum_steps = 2 × 3"]),
    (["optim.global_batch_size=63"], 2, ["optim.global_batch_size", "63", "multiple of world_size"]),
    (["data.augment.global_size=30", "model.patch_size=4"], 1, ["data.augment.global_size", "30", "multiple of model.patch_size=4"]),
    (["data.augment.local_size=90"], 1, ["data.augment.local_size", "90", "multiple of model.patch_size=16"]),
    (["model.name=vil3_tiny"], 1, ["model.name", "'vil3_tiny'", "registered ViL model"]),
    (["objective.name=dino"], 1, ["objective.name", "unknown key", "removed", "objective.ibot_weight"]),
    (["optim.total_steps=5"], 1, ["optim.total_steps", "did you mean schedule.total_steps?"]),
    (["optim.name=adamw"], 1, ["optim.name", "unknown key", "removed"]),
    (["objective.dino_head.nlayers=2"], 1,
     ["objective.dino_head.nlayers", "did you mean objective.dino_head.n_layers"]),
    (["objective.dino_head.out_dim=0"], 1, ["objective.dino_head.out_dim", "0", "positive integer"]),
    (["objective.ibot_head.batch_norm=maybe"], 1, ["objective.ibot_head.batch_norm", "'maybe'", "bool"]),
    (["objective.dino_weight=0"], 1, ["objective.dino_weight", "0.0", "positive weight"]),
    (["objective.ibot_weight=-1"], 1, ["objective.ibot_weight", "-1.0", "non-negative"]),
    (["objective.ibot_weight=0", "objective.shared_head=true"], 1, ["objective.shared_head", "ibot_weight is 0"]),
    (["objective.shared_head=true"], 1, ["objective.shared_head", "width 768", "pooling='bilateral_avg'/'avg'"]),
    (["objective.shared_head=true", "objective.pooling=avg", "objective.ibot_head.out_dim=8"], 1,
     ["objective.shared_head", "ibot_head null or equal to dino_head"]),
    (["objective.pooling=bilateral"], 1, ["objective.pooling", "'bilateral'", "did you mean 'bilateral_avg'"]),
    (["checkpoint.keep_last=1"], 1, ["checkpoint.keep_last", "1", "at least 2"]),
    (["knn_monitor.k=[]"], 1, ["knn_monitor.k", "[]", "non-empty list"]),
    (["eval.knn_k=[5]"], 1, ["eval", "renamed to knn_monitor"]),
    (["train.grad_scaler=true"], 1, ["train.grad_scaler", "unknown key"]),
    (["schedule.total_steps=null"], 1, ["schedule.total_*", "none set", "exactly one of"]),
    (["schedule.total_steps=null", "schedule.total_epochs=2"], 1, ["schedule.total_epochs", "2", "epoch size is unknown"]),
    (["masking.mask_ratio=[0.6, 0.5]"], 1, ["masking.mask_ratio", "[0.6, 0.5]", "0 <= min <= max <= 1"]),
    (["objective.mask_ratio_min=0.6"], 1, ["objective.mask_ratio_min", "moved to masking.mask_ratio"]),
    (["masking.mode=blocks"], 1, ["masking.mode", "'blocks'", "did you mean 'block'"]),
    (["data.train=pipe:curl http://x/a.tar"], 1, ["data.train", "pipe:", "allow_pipe=true"]),
    (["objective.centering=sinkorn"], 1, ["objective.centering", "'sinkorn'", "did you mean 'sinkhorn_knopp'"]),
    (["optim.layer_decay=1.5"], 1, ["optim.layer_decay", "1.5", "(0, 1]"]),
    (["data.error_budget_fraction=2"], 1, ["data.error_budget_fraction", "2.0", "fraction"]),
    (["knn_monitor.every_steps=10"], 1, ["knn_monitor.train", "knn_monitor.val"]),
    (["objective.student_temp=0"], 1, ["objective.student_temp", "0.0", "positive temperature"]),
    (["schedule.total_steps=-5"], 1, ["schedule.total_steps", "-5", "positive"]),
]


@pytest.mark.parametrize("overrides,world_size,needles", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_raises_config_error(overrides, world_size, needles):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=BASE + overrides, world_size=world_size)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_bad_configs_fail_fast():
    # Validation happens before any heavy work: all bad configs together in well under 2 s.
    load_config(overrides=BASE)  # warm imports (timm registry) outside the timed part
    t0 = time.perf_counter()
    for overrides, world_size, _ in BAD:
        with pytest.raises(ConfigError):
            load_config(overrides=BASE + overrides, world_size=world_size)
    assert time.perf_counter() - t0 < 2.0


def test_bad_yaml_file_names_file(tmp_path: Path):
    p = tmp_path / "r.yaml"
    p.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="r.yaml.*invalid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("optim:\n  lr: 1e-3\n  lrr: 2\n")
    with pytest.raises(ConfigError, match="optim.lrr: unknown key; did you mean optim.lr"):
        load_config(p, BASE)


def test_layering_defaults_recipe_cli(tmp_path: Path):
    p = tmp_path / "r.yaml"
    p.write_text("optim: {lr: 1e-3, global_batch_size: 256, lr_scaling: linear, lr_reference_batch_size: 128}\n"
                 "schedule: {total_samples: 2560, warmup_epochs: 0.5}\ndata: {samples_per_epoch: 1024}\n")
    cfg = load_config(p, ["optim.global_batch_size=512"], world_size=4)
    assert cfg.optim.lr == 1e-3  # YAML 1.1 "1e-3" string accepted for a float field
    assert cfg.optim.weight_decay == 0.04  # default kept
    d = cfg.derived
    assert (d.world_size, d.per_rank_batch_size, d.micro_batch_size) == (4, 128, 128)
    assert d.peak_lr == pytest.approx(1e-3 * 512 / 128)
    assert d.total_steps == 5  # ceil(2560 / 512)
    assert d.warmup_steps == 1  # ceil(0.5 * 1024 / 512)
    sqrt = load_config(p, ["optim.lr_scaling=sqrt", "optim.grad_accum_steps=2"], world_size=2)
    assert sqrt.derived.peak_lr == pytest.approx(1e-3 * (256 / 128) ** 0.5)
    assert sqrt.derived.micro_batch_size == 64


def test_resolved_yaml_round_trips_and_diff(tmp_path: Path):
    cfg = load_config(overrides=BASE + ["model.dim=64"])
    p = tmp_path / "config.yaml"
    p.write_text(to_yaml(cfg))
    again = load_config(p)
    assert to_yaml(again) == to_yaml(cfg)
    other = load_config(p, ["model.dim=96", "data.num_workers=0", "optim.lr=1e-3"])
    assert [k for k, _, _ in diff_configs(cfg, other)] == ["model.dim", "optim.lr"]


@pytest.mark.parametrize("recipe", pretraining_recipes(), ids=lambda p: p.name)
def test_recipe_matches_snapshot(recipe: Path):
    text = resolved_text(recipe)
    snap = SNAPSHOTS / f"{recipe.stem}.resolved.yaml"
    assert snap.exists(), f"missing snapshot {snap}; run `make snapshots`"
    assert text == snap.read_text(), f"{recipe.name} resolves differently from its snapshot; run `make snapshots` if intended"


def test_recipes_start_with_command_hardware_and_targets():
    for recipe in pretraining_recipes():
        head = recipe.read_text().split("\n", 8)[:8]
        joined = "\n".join(head)
        assert head[0].startswith("#"), recipe.name
        assert "Command" in joined and "Hardware" in joined and "not" in joined and "result" in joined, recipe.name


def test_epoch_schedule_sized_from_the_shard_manifest(tmp_path: Path):
    from ssl_vil.data.make_shards import main as make_shards

    assert make_shards(["builtin:digits", str(tmp_path / "val"), "--split", "val"]) == 0
    cfg = load_config(overrides=["optim.global_batch_size=64", "schedule.total_epochs=2",
                                 f"data.train={tmp_path / 'val'}"])
    assert cfg.derived.samples_per_epoch == 500
    assert cfg.derived.total_steps == 16  # ceil(2 * 500 / 64)
