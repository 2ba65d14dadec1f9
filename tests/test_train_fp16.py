"""fp16 trains with a real dynamic loss scaler: its state is checkpointed, its overflow skips agree with the step
guard (every rank skips the same steps), and a SIGKILL resume continues bitwise like the uninterrupted run."""

from __future__ import annotations

import json
import signal

import pytest

from ssl_vil.checkpoint import latest_checkpoint
from trainer_harness import assert_tree_equal, final_payload, launch, logs, losses, run_training, tiny_overrides, \
    wait_all, write_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 16
INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's default


def _skips(run) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "step_skipped":
            out[rec["step"]] = {k: v for k, v in rec.items() if k != "time_s"}
    return out


def test_fp16_scaler_state_and_sigkill_resume(tmp_path):
    write_shards(tmp_path / "shards")
    overrides = tiny_overrides(tmp_path / "shards", total_steps=STEPS, workers=0) + ["train.precision=fp16"]
    ref = tmp_path / "reference"
    assert run_training(ref, overrides) == [0], logs(ref)

    payload = final_payload(ref)
    scaler = payload["grad_scaler"]
    assert set(scaler) >= {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    # The tiny model overflows at the initial scale: the scaler backed off, and each overflow was a skipped step
    # the guard reported as such (not as a non-finite fault: the finite guard's counters stay at zero).
    skips = _skips(ref)
    assert skips and all(r["overflow"] == 1.0 and r["nonfinite"] == 0.0 for r in skips.values()), skips
    assert scaler["scale"] == INITIAL_SCALE / 2 ** len(skips), (scaler, sorted(skips))
    assert payload["train_state"]["finite_guard"] == {"skipped_total": 0, "consecutive": 0}

    run = tmp_path / "killed"
    procs = launch(run, overrides, fault="kill:step=11,rank=0,at=mid_step")
    assert wait_all(procs) == [-signal.SIGKILL], logs(run)
    assert wait_all(launch(run, overrides)) == [0], logs(run)
    assert losses(run) == losses(ref)
    assert _skips(run) == _skips(ref)
    a, b = final_payload(ref), final_payload(run)
    assert latest_checkpoint(run).name == f"step_{STEPS:08d}"
    for key in ("objective", "optimizer", "grad_scaler", "train_state"):
        assert_tree_equal(a[key], b[key], key)
