"""Run dirs written by an earlier version of ssl_vil (the config layout before the component configs: objective.name,
nlayers / batchnorm, objective.mask_*, eval.knn_*) still resume, evaluate and export.

``tests/fixtures/run_v0`` is a real run dir of that version (a 2-step tiny DINO pretraining on builtin:digits, its
config.yaml, metrics and step-2 checkpoint as written), not one rebuilt by the current code.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ssl_vil.checkpoint import CheckpointManager
from ssl_vil.config import ConfigError, load_config, to_dict
from ssl_vil.config.upgrade import upgrade_record
from ssl_vil.infra.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]
RUN_V0 = Path(__file__).parent / "fixtures" / "run_v0"


def test_the_earlier_layout_reads_as_the_computation_it_ran():
    cfg = load_config(RUN_V0 / "config.yaml", world_size=1)  # a run's record: upgraded
    o, m, k = cfg.objective, cfg.masking, cfg.knn_monitor
    # objective.name=dino zeroed the iBOT and KoLeo terms whatever their recorded weights (1.0 / 0.1).
    assert (o.dino_weight, o.ibot_weight, o.koleo_weight, o.ibot_head) == (1.0, 0.0, 0.0, None)
    assert (o.dino_head.out_dim, o.dino_head.n_layers, o.dino_head.batch_norm) == (64, 3, True)
    assert (m.mode, m.mask_probability, m.mask_ratio) == ("block", 0.5, (0.1, 0.5))
    assert (k.every_steps, k.k, k.batch_size) == (0, [10, 20, 100, 200], 256)
    assert (cfg.model.dim, cfg.model.depth, cfg.derived.total_steps) == (32, 1, 2)


@pytest.mark.parametrize(("name", "ibot", "koleo"), [("dino", 0.0, 0.0), ("ibot", 1.0, 0.0), ("dinov2", 1.0, 0.1)])
def test_objective_name_sets_the_weights_it_implied(name, ibot, koleo):
    record = yaml.safe_load((RUN_V0 / "config.yaml").read_text())
    record["objective"].update(name=name, centering="sinkhorn")
    data, notes = upgrade_record(record)
    assert "name" not in data["objective"] and data["objective"]["centering"] == "sinkhorn_knopp"
    assert (data["objective"]["ibot_weight"], data["objective"]["koleo_weight"]) == (ibot, koleo)
    assert data["objective"]["ibot_head"] == (None if name == "dino" else {
        "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "n_layers": 3, "batch_norm": False,
        "norm_last_layer": True})
    assert any(n.startswith(f"objective.name={name}") for n in notes)
    assert record["objective"]["name"] == name  # the input is not modified


def test_a_current_record_is_left_as_it_is():
    record = to_dict(load_config(REPO / "recipes" / "demo_digits.yaml", world_size=1))
    assert upgrade_record(record) == (record, [])


def test_a_recipe_with_earlier_keys_is_still_refused_with_the_move(tmp_path):
    recipe = yaml.safe_load((RUN_V0 / "config.yaml").read_text())
    del recipe["derived"]  # a recipe, not a run's record: taken as written
    (tmp_path / "recipe_v0.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="eval: unknown key; renamed to knn_monitor"):
        load_config(tmp_path / "recipe_v0.yaml")


@pytest.mark.slow
def test_an_earlier_run_dir_resumes_exports_and_evaluates(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUN_V0, run)
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "ssl_vil.data.make_shards", "builtin:digits", str(shards), "--split",
                    "train"], check=True, capture_output=True, cwd=REPO)
    saved = CheckpointManager.load_folder(run / "checkpoints" / "step_00000002").payload["objective"]

    # The weights of the earlier run load as they were saved (teacher backbone).
    from ssl_vil.export import load_pretrained_backbone

    model, info = load_pretrained_backbone(str(run), None)
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in saved.items() if k.startswith("teacher.backbone.")}
    assert info["model"] == "vil2_tiny_patch16_224" and teacher.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in teacher.items())

    # Resumed with its own config.yaml, extended by 2 steps.
    done = subprocess.run([sys.executable, "-m", "ssl_vil.train", "--config", str(run / "config.yaml"),
                           "--output-dir", str(run), f"data.train={shards}", "schedule.total_steps=4"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "resumed"] == [2]
    assert [r["step"] for r in records if "losses" in r] == [1, 2, 3, 4]
    assert all(r["losses"]["ibot"] == 0 and r["losses"]["koleo"] == 0 for r in records if r.get("step", 0) > 2
               and "losses" in r)
    # The run dir now records the current layout, and the continuation started from the saved state: the teacher
    # moved by EMA from the saved one (not from a fresh init).
    rewritten = yaml.safe_load((run / "config.yaml").read_text())
    assert "eval" not in rewritten and "name" not in rewritten["objective"]
    assert load_config(run / "config.yaml").objective.ibot_weight == 0.0
    after = CheckpointManager.load_folder(run / "checkpoints" / "step_00000004").payload["objective"]
    assert after.keys() == saved.keys()
    before_t = torch.cat([saved[f"teacher.backbone.{k}"].flatten().float() for k in teacher])
    after_t = torch.cat([after[f"teacher.backbone.{k}"].flatten().float() for k in teacher])
    change = float((after_t - before_t).norm() / before_t.norm())
    assert 0 < change < 0.01, change  # two EMA steps away from the saved teacher, not a new one
    assert (run / "export" / "teacher_backbone.safetensors").exists()
