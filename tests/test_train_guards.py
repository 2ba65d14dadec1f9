"""Trainer-level guards with real processes: non-finite skip/halt, loss spikes, teacher collapse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_vil.checkpoint import CheckpointManager
from ssl_vil.train.cli import GUARD_EXIT_CODE
from trainer_harness import assert_tree_equal, logs, records, run_training, tiny_overrides, write_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guards")
    write_shards(root / "shards")
    return root / "shards"


def _step_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run) if "losses" in r}


def _state(run: Path, step: int) -> dict:
    return CheckpointManager.load_folder(run / "checkpoints" / f"step_{step:08d}").payload


def test_nonfinite_skips_same_steps_on_all_ranks_with_state_unchanged(shards, tmp_path):
    # Step indices are 0-based inside the step (index 7 = the 8th step): NaN in iBOT on rank 1 only, +inf in
    # KoLeo on rank 0 only, a NaN gradient on rank 1 only.
    fault = ("loss:step=7,rank=1,term=ibot,value=nan;loss:step=9,rank=0,term=koleo,value=inf;"
             "grad:step=11,rank=1")
    run = tmp_path / "run"
    overrides = tiny_overrides(shards, total_steps=14) + ["checkpoint.every_steps=1", "checkpoint.keep_last=20"]
    assert run_training(run, overrides, world_size=2, fault=fault) == [0, 0], logs(run)
    recs = _step_records(run)
    assert [s for s, r in recs.items() if r["skipped"]] == [8, 10, 12]
    for skipped in (8, 10, 12):
        before, after = _state(run, skipped - 1), _state(run, skipped)
        # Model, teacher, centers and optimizer moments are bitwise unchanged across a skipped step.
        assert_tree_equal(before["objective"], after["objective"], "objective")
        assert_tree_equal(before["optimizer"]["state"], after["optimizer"]["state"], "optimizer moments")
        assert after["train_state"]["finite_guard"]["skipped_total"] == (skipped - 6) // 2
    assert _state(run, 14)["train_state"]["finite_guard"]["skipped_total"] == 3
    events = [r for r in records(run) if r.get("event") == "step_skipped"]
    assert [e["step"] for e in events] == [8, 10, 12]


def test_fourth_consecutive_nonfinite_step_halts(shards, tmp_path):
    run = tmp_path / "run"
    codes = run_training(run, tiny_overrides(shards, total_steps=14), world_size=2,
                         fault="loss:steps=3|4|5|6,rank=1,term=ibot,value=nan")
    assert codes == [GUARD_EXIT_CODE, GUARD_EXIT_CODE], logs(run)
    text = logs(run)
    assert "NonFiniteError" in text and "ibot on rank 1" in text and "step 6" in text
    recs = _step_records(run)
    assert [s for s, r in recs.items() if r["skipped"]] == [4, 5, 6]
    keys = json.loads((run / "nonfinite_step6_rank1.json").read_text())
    assert len(keys["batch_keys"] if isinstance(keys, dict) else keys) == 4  # rank 1's 4 samples of that step


def test_halt_policy_raises_before_optimizer_step(shards, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(shards, total_steps=14) + ["guards.nonfinite_policy=halt", "checkpoint.every_steps=1"]
    codes = run_training(run, overrides, world_size=2, fault="loss:step=3,rank=0,term=dino,value=nan")
    assert codes == [GUARD_EXIT_CODE, GUARD_EXIT_CODE], logs(run)
    assert "dino on rank 0" in logs(run) and "step 3" in logs(run)
    assert (run / "nonfinite_step3_rank0.json").exists() and not (run / "nonfinite_step3_rank1.json").exists()
    # The last checkpoint is step 3 (three good steps); the halted 4th step never reached the optimizer.
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*"))[-1] == "step_00000003"


def test_loss_spike_is_skipped_on_all_ranks_and_clean_run_has_no_flag(shards, tmp_path):
    base = tiny_overrides(shards, total_steps=40) + ["guards.spike_detection=true", "guards.spike_window_steps=50"]
    clean, spiky = tmp_path / "clean", tmp_path / "spiky"
    assert run_training(clean, base, world_size=2) == [0, 0], logs(clean)
    assert run_training(spiky, base, world_size=2, fault="loss:step=30,scale=50") == [0, 0], logs(spiky)
    assert [s for s, r in _step_records(clean).items() if r["skipped"]] == []
    flagged = [s for s, r in _step_records(spiky).items() if r["skipped"]]
    assert flagged == [31]
    assert _step_records(spiky)[31]["losses"]["loss"] == pytest.approx(50 * _step_records(clean)[31]["losses"]["loss"],
                                                                      rel=1e-5)
    # Up to the spike both runs are the same computation.
    assert [_step_records(spiky)[s]["losses"] for s in range(1, 31)] == \
        [_step_records(clean)[s]["losses"] for s in range(1, 31)]


def test_forced_collapse_is_detected(shards, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(shards, total_steps=60) + [
        "objective.teacher_temp=1.0", "objective.warmup_teacher_temp=1.0", "guards.collapse_window_steps=20"]
    codes = run_training(run, overrides, world_size=1)
    assert codes == [GUARD_EXIT_CODE], logs(run)
    text = logs(run)
    assert "CollapseError" in text and "ln K" in text
    assert max(_step_records(run)) == 19  # the 20th near-uniform step raises before it is logged
