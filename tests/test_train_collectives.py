"""The step guard is the only per-step collective of the training loop (besides DDP's gradient buckets and the
objective's center sums): non-finite, spike, preemption and data-budget decisions and the logged metrics share
one all-reduce. Counted on a real 2-process gloo run with ``torch.distributed.all_reduce`` wrapped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trainer_harness import RECIPE, ROOT, free_port, tiny_overrides, write_shards

pytestmark = [pytest.mark.slow]

STEPS = 6


def test_one_guard_collective_per_step(tmp_path):
    write_shards(tmp_path / "shards")
    overrides = tiny_overrides(tmp_path / "shards", total_steps=STEPS, workers=0) + ["checkpoint.every_steps=100"]
    port, out = free_port(), tmp_path / "calls.json"
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSL_VIL_")}
        env |= {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "count_collectives.py"), str(out), "--config", str(RECIPE),
             "--output-dir", str(tmp_path / "run"), *overrides],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for rank in range(2):
        calls = json.loads((tmp_path / f"calls.json.rank{rank}").read_text())["calls"]
        train_calls = {f: n for f, n in calls.items() if f.startswith("ssl_vil/train/")}
        # One per step from the step guard; nothing else in the training loop reduces per step. The loop's two
        # are once per run, at start-up: the ranks agree that the lock was taken and that the restore succeeded.
        assert train_calls == {"ssl_vil/train/step_guard.py": STEPS, "ssl_vil/train/loop.py": 2}, calls
