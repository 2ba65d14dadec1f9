"""Exact resume of a 2-process gloo run after SIGKILL, and after a kill during a checkpoint write.

The reference is an uninterrupted 40-step run; each interrupted run is killed with SIGKILL (all ranks) at a
planted point and relaunched in the same run dir. Per-step losses, the final checkpoint (student, teacher,
centers, optimizer, data cursor, guards, RNG) and the per-rank key sequences must equal the reference bitwise.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from ssl_vil.checkpoint import latest_checkpoint
from faultinject import read_key_log
from trainer_harness import (assert_tree_equal, final_payload, launch, logs, losses, run_training, tiny_overrides,
                             wait_all, write_shards)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_shards(root / "shards")
    overrides = tiny_overrides(root / "shards", total_steps=STEPS) + ["optim.grad_accum_steps=2"]
    ref = root / "reference"
    assert run_training(ref, overrides, world_size=2) == [0, 0], logs(ref)
    return root, overrides, ref


def _assert_same_run(ref: Path, run: Path) -> None:
    assert losses(run) == losses(ref)  # exact float equality, every step 1..40
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    for rank in (0, 1):
        assert read_key_log(run / "keys" / f"rank{rank}.jsonl") == read_key_log(ref / "keys" / f"rank{rank}.jsonl")
    a, b = final_payload(ref), final_payload(run)
    assert latest_checkpoint(run).name == latest_checkpoint(ref).name == f"step_{STEPS:08d}"
    assert_tree_equal(a["objective"], b["objective"], "objective")
    assert_tree_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert_tree_equal(a["train_state"], b["train_state"], "train_state")
    assert (run / "export" / "teacher_backbone.safetensors").read_bytes() == \
        (ref / "export" / "teacher_backbone.safetensors").read_bytes()


def _kill(run: Path, overrides: list[str], fault: str) -> None:
    """Launch with ``fault``; the faulting rank SIGKILLs itself, its peer (blocked in a collective) is killed too."""
    procs = launch(run, overrides, world_size=2, fault=fault)
    while all(p.poll() is None for p in procs):
        time.sleep(0.2)
    first = next(p for p in procs if p.poll() is not None)
    assert first.returncode == -signal.SIGKILL, logs(run)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    wait_all(procs)


def _resumed_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"event": "resumed"' in line]


def test_sigkill_resume_is_exact(setup):
    """Killed right after a checkpoint, mid-interval, and between the micro-batches of an accumulated step."""
    root, overrides, ref = setup
    run = root / "sigkill"
    _kill(run, overrides, "kill:step=10,rank=0,at=after_checkpoint")
    _kill(run, overrides, "kill:step=13,rank=1,at=mid_step")
    _kill(run, overrides, "kill:step=21,rank=0,at=accumulation")  # step index 21 = the 22nd step
    assert wait_all(launch(run, overrides, world_size=2)) == [0, 0], logs(run)
    assert _resumed_steps(run) == [10, 10, 20]
    _assert_same_run(ref, run)


def test_kill_during_checkpoint_write(setup):
    """Killed after half the payload bytes (resumes from the previous step), then after the payload but before
    LATEST (the complete folder is used); no orphan temp folders after the next save."""
    root, overrides, ref = setup
    run = root / "ckpt_write"
    _kill(run, overrides, "ckpt_write:step=20,kill_after_fraction=0.5")
    _kill(run, overrides, "ckpt_write:step=30,kill_before_latest=1")
    assert wait_all(launch(run, overrides, world_size=2)) == [0, 0], logs(run)
    assert _resumed_steps(run) == [15, 30]
    assert not list((run / "checkpoints").glob(".tmp*")), "orphan temp folders after the next save"
    _assert_same_run(ref, run)
