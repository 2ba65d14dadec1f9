"""Preemption: SIGUSR2 to one rank of two -> both save the same step and exit for requeue; resume loses nothing."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from ssl_vil.train.cli import REQUEUE_EXIT_CODE
from trainer_harness import (assert_tree_equal, final_payload, launch, logs, losses, run_training, tiny_overrides,
                             wait_all, write_shards)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 24


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM], ids=["SIGUSR2", "SIGTERM"])
def test_signal_to_one_rank_stops_both_at_same_step_and_resume_is_exact(tmp_path, sig):
    write_shards(tmp_path / "shards")
    overrides = tiny_overrides(tmp_path / "shards", total_steps=STEPS) + ["checkpoint.every_steps=100"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_training(ref, overrides, world_size=2) == [0, 0], logs(ref)

    procs = launch(run, overrides, world_size=2)
    deadline = time.time() + 240
    while _logged_steps(run) < 6 and time.time() < deadline:
        time.sleep(0.05)
    procs[1].send_signal(sig)  # rank 1 only
    assert wait_all(procs) == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE], logs(run)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1, ckpts  # exactly one checkpoint, at the step both ranks stopped
    stopped = int(ckpts[0].split("_")[1])
    assert 6 <= stopped < STEPS
    assert _logged_steps(run) == stopped  # no rank ran past the agreed step
    assert '"event": "preempted"' in (run / "metrics.jsonl").read_text()

    assert run_training(run, overrides, world_size=2) == [0, 0], logs(run)
    assert losses(run) == losses(ref)  # zero steps lost or repeated, exact continuation
    assert_tree_equal(final_payload(ref)["objective"], final_payload(run)["objective"], "objective")
    assert_tree_equal(final_payload(ref)["optimizer"], final_payload(run)["optimizer"], "optimizer")
