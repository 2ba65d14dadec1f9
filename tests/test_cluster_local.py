"""``cluster/submit.py --local``: the same job through submitit's local executor (one node, two processes).

Rank 1 receives SIGUSR2 after step 2 (fault injection). Both ranks save step 2 and return the requeue code; rank 0
requeues through submitit's local requeue path (exit code 144, the controller restarts the tasks), rank 1 follows
it, and the restarted tasks resume from step 2 and finish.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import faultinject
from cluster import submit as submit_cli
from cluster.job import EVENTS_FILENAME

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo_digits.yaml"
TOTAL_STEPS = 6


def test_local_executor_run_requeues_after_a_signal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "ssl_vil.data.make_shards", "builtin:digits", str(shards), "--split",
                    "train", "--maxcount", "200"], check=True, capture_output=True, timeout=300)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SSL_VIL_FAULT", "signal:step=2,rank=1")
    monkeypatch.setenv("PYTHONPATH", faultinject.pythonpath())  # the job processes install the fault hooks
    rc = submit_cli.main([
        "--config", str(RECIPE), "--output-dir", str(run_dir), "--local", "--cpu", "--nodes", "1",
        "--gpus-per-node", "2", "--cpus-per-task", "1", "--timeout-min", "10",
        f"data.train={shards}", "train.device=cpu", f"schedule.total_steps={TOTAL_STEPS}", "schedule.warmup_steps=2",
        "schedule.freeze_last_layer_steps=1", "optim.global_batch_size=8", "data.augment.n_local=2",
        "objective.dino_head.out_dim=256", "objective.dino_head.hidden_dim=128", "logging.log_every_steps=1",
        "logging.tensorboard=false", "checkpoint.every_steps=1000"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Traceback" not in out and not any(line.startswith("{") for line in out.splitlines()), out
    job_line = next(line for line in out.splitlines() if line.startswith("job ") and " finished: " in line)
    job_id = job_line.split()[1]
    assert job_line == f"job {job_id} finished: train, rank 0 exit 0, rank 1 exit 0; requeued 1 time(s)"
    results = json.loads((run_dir / "local" / f"results-{job_id}.json").read_text())
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["exit_code"] == 0 for r in results)
    assert all(r["requeues"] == 1 for r in results)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records if r.get("event") in ("preempted", "resumed")] == [
        ("preempted", 2), ("resumed", 2)]
    assert [r["step"] for r in records if "event" not in r] == list(range(1, TOTAL_STEPS + 1))
    events = [json.loads(line) for line in (run_dir / "local" / EVENTS_FILENAME).read_text().splitlines()]
    assert [(e["event"], e.get("resume_step")) for e in events] == [
        ("start", None), ("checkpoint", 2), ("start", None), ("finished", None)]
    assert events[2]["step_at_start"] == 2 and events[2]["recorded_resume_step"] == 2
    assert (run_dir / "export" / "teacher_backbone.safetensors").is_file()
    assert not (run_dir / "local" / "%j").exists(), "the executor's literal folder template was left behind"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000002", f"step_{TOTAL_STEPS:08d}"]
