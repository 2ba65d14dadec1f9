"""HangWatchdog: a stalled step loop is killed with a stack dump; a healthy or paused one is left alone.

The watchdog ends its process with ``os._exit``, so it runs in a subprocess: this file executed as a script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faultinject import ENV_VAR, maybe_inject_sleep
from ssl_vil.train.watchdog import HANG_EXIT_CODE, HangWatchdog

HANG_TIMEOUT_S = 1.5


def run_steps_until_stuck(watchdog: HangWatchdog, rank: int) -> None:
    for step in range(10):
        maybe_inject_sleep(step, rank)  # the planted fault stalls step 3 forever
        watchdog.beat(step)
        print(f"beat {step} {time.time():.3f}", flush=True)


def watchdog_worker(run_dir: str) -> None:
    run_dir_path = Path(run_dir)
    # Healthy loop: beats every 20 ms against a 2 s timeout, then a paused 3 s "evaluation".
    healthy = HangWatchdog(timeout_s=2.0, run_dir=run_dir_path, rank=0)
    healthy.start()
    for step in range(25):
        time.sleep(0.02)
        healthy.beat(step)
    with healthy.paused():
        time.sleep(3.0)
    healthy.beat(25)
    healthy.stop()
    print(f"healthy-ok {not (run_dir_path / 'hang_rank0.txt').exists()}", flush=True)

    os.environ[ENV_VAR] = "sleep:rank=1,step=3,secs=inf"
    stuck = HangWatchdog(timeout_s=HANG_TIMEOUT_S, run_dir=run_dir_path, rank=1)
    stuck.start()
    run_steps_until_stuck(stuck, rank=1)
    print("not-stuck", flush=True)  # unreachable when the fault works


@pytest.mark.slow
def test_stalled_rank_dumps_stacks_and_exits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    proc = subprocess.Popen([sys.executable, __file__, "watchdog_worker", str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    exited_at = time.time()
    assert proc.returncode == HANG_EXIT_CODE, (out, err)
    lines = out.splitlines()
    assert lines[0] == "healthy-ok True"
    assert [line.split()[1] for line in lines[1:]] == ["0", "1", "2"]
    last_beat_at = float(lines[-1].split()[2])
    assert exited_at - last_beat_at <= HANG_TIMEOUT_S + 5

    assert not (tmp_path / "hang_rank0.txt").exists()
    dump = (tmp_path / "hang_rank1.txt").read_text()
    assert "rank 1" in dump and "last completed step: 2" in dump and f"exiting with code {HANG_EXIT_CODE}" in dump
    # The stacks show where the main thread sleeps.
    assert "maybe_inject_sleep" in dump and "run_steps_until_stuck" in dump and "watchdog_worker" in dump
    assert "maybe_inject_sleep" in err  # also on stderr, for the Slurm log


def test_inject_sleep_fires_only_at_its_step_and_rank(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # the module calls time.sleep
    monkeypatch.setenv(ENV_VAR, "sleep:rank=1,step=12,secs=0.25")
    for step in range(20):
        maybe_inject_sleep(step, rank=0)
    maybe_inject_sleep(11, rank=1)
    assert slept == []
    maybe_inject_sleep(12, rank=1)
    assert slept == [0.25]


def test_rejects_non_positive_timeout(tmp_path):
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        HangWatchdog(timeout_s=0, run_dir=tmp_path, rank=0)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
