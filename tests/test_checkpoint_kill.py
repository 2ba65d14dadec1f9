"""SIGKILL during a checkpoint save (real subprocess, real files): restart picks the right step, no orphans."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import faultinject
from ssl_vil.checkpoint import CheckpointManager, latest_checkpoint

# Shared by the child process and the test, so the test knows exactly what each step held.
PAYLOAD_SRC = textwrap.dedent(
    """
    import torch

    def step_payload(step):
        g = torch.Generator().manual_seed(1000 + step)
        return {
            "student": {"w": torch.randn(64, 64, generator=g), "step": step},
            "teacher": {"w": torch.randn(64, 64, generator=g)},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(64, 64, generator=g)}}, "param_groups": [{"lr": 0.1}]},
        }

    def make_manager(run_dir):
        from ssl_vil.checkpoint import CheckpointManager
        return CheckpointManager(run_dir, keep_last=3, keep_every_steps=10, config_hash="h", world_size=1, git_sha=None)
    """
)
CHILD_SRC = PAYLOAD_SRC + textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    manager = make_manager(Path(sys.argv[1]))
    for step in (5, 10, 15, 20):
        manager.save(step, step_payload(step))
        print(f"saved {step}", flush=True)
    """
)
_helpers: dict = {}
exec(PAYLOAD_SRC, _helpers)
step_payload = _helpers["step_payload"]
make_manager = _helpers["make_manager"]


def run_child(tmp_path: Path, fault: str) -> subprocess.CompletedProcess:
    script = tmp_path / "save_then_die.py"
    script.write_text(CHILD_SRC)
    env = faultinject.child_env(fault=fault)
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def ckpt_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_loads_step(run_dir: Path, step: int, caplog) -> CheckpointManager:
    manager = make_manager(run_dir)
    with caplog.at_level(logging.WARNING, logger="ssl_vil.checkpoint"):
        loaded = manager.load_latest()
    assert loaded.step == step and manager.fallbacks == 0
    expected = step_payload(step)
    for name in ("student", "teacher"):
        assert torch.equal(loaded.payload[name]["w"], expected[name]["w"])
    assert loaded.payload["student"]["step"] == step
    assert torch.equal(
        loaded.payload["optimizer"]["state"][0]["exp_avg"], expected["optimizer"]["state"][0]["exp_avg"]
    )
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / f"step_{step:08d}"
    return manager


@pytest.mark.slow
def test_kill_halfway_through_payload_resumes_from_previous_step(tmp_path, caplog):
    proc = run_child(tmp_path, "ckpt_write:step=20,kill_after_fraction=0.5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["saved", "5", "saved", "10", "saved", "15"]
    match = re.search(r"checkpoint step 20 after (\d+) of (\d+) payload bytes.*SIGKILL to pid (\d+)", proc.stderr)
    assert match, proc.stderr
    written, total, pid = (int(g) for g in match.groups())
    assert written == total // 2 > 0

    run_dir = tmp_path / "run"
    temp_name = f".tmp-step_00000020-{pid}"
    assert ckpt_entries(run_dir) == [temp_name, "LATEST", "step_00000005", "step_00000010", "step_00000015"]
    partial = run_dir / "checkpoints" / temp_name
    assert not (partial / "manifest.json").exists()
    assert sum(p.stat().st_size for p in partial.iterdir()) == written  # really died mid-payload
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "step_00000015\n"

    manager = assert_loads_step(run_dir, 15, caplog)
    manager.save(20, step_payload(20))
    assert ckpt_entries(run_dir) == ["LATEST", "step_00000010", "step_00000015", "step_00000020"]
    assert_loads_step(run_dir, 20, caplog)


@pytest.mark.slow
def test_kill_after_rename_before_latest_resumes_from_the_complete_folder(tmp_path, caplog):
    proc = run_child(tmp_path, "ckpt_write:step=20,kill_before_latest=1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["saved", "5", "saved", "10", "saved", "15"]
    assert "checkpoint step 20 renamed into place, LATEST not yet updated" in proc.stderr

    run_dir = tmp_path / "run"
    # Step 20 is complete, LATEST still names 15, and retention for 20 never ran (5 is still there).
    assert ckpt_entries(run_dir) == ["LATEST", "step_00000005", "step_00000010", "step_00000015", "step_00000020"]
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "step_00000015\n"

    # Documented rule: the newest verified step folder wins; LATEST is a hint.
    manager = assert_loads_step(run_dir, 20, caplog)
    assert any("'step_00000015'" in r.getMessage() and "step_00000020" in r.getMessage() for r in caplog.records)
    manager.save(25, step_payload(25))
    assert ckpt_entries(run_dir) == ["LATEST", "step_00000010", "step_00000015", "step_00000020", "step_00000025"]
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "step_00000025\n"
