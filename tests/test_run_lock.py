"""One writer per run dir: ``RUN/.lock`` (real trainer processes and real lock files).

A second trainer on a live run refuses, naming the holder, and the first one finishes exactly like a solo run; a
lock left by a SIGKILLed trainer does not block the resume; holders on other hosts are refused unless they are an
earlier attempt of the same Slurm job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_vil.train.run_dir import LOCK_FILE, RunDirLock, RunDirLocked
from trainer_harness import (RECIPE, ROOT, assert_tree_equal, final_payload, launch, logs, losses, records,
                             tiny_overrides, wait_all, write_shards)

STEPS = 6


def overrides_for(shards: Path) -> list[str]:
    # One data-loader worker: a forked worker outlives a SIGKILLed trainer briefly, and must not keep its lock.
    return tiny_overrides(shards, total_steps=STEPS, workers=1) + ["checkpoint.every_steps=2",
                                                                    "logging.log_every_steps=1"]


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    write_shards(root / "shards")
    ref = root / "solo"
    assert wait_all(launch(ref, overrides_for(root / "shards"))) == [0], logs(ref)
    return root, ref


def _assert_same_as_solo(ref: Path, run: Path) -> None:
    steps = [r["step"] for r in records(run) if "losses" in r]
    assert steps == list(range(1, STEPS + 1))  # every metrics line present, none twice
    assert losses(run) == losses(ref)
    a, b = final_payload(ref), final_payload(run)
    for name in ("objective", "optimizer", "train_state"):
        assert_tree_equal(a[name], b[name], name)
    assert not (run / LOCK_FILE).exists()


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_second_trainer_refuses_naming_the_holder_and_the_first_is_unharmed(solo):
    root, ref = solo
    run = root / "shared"
    # The first trainer stalls before step 1 long enough for the second to reach the lock.
    first = launch(run, overrides_for(root / "shards"), fault="sleep:step=1,secs=25")
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() or first[0].poll() is not None)
        assert first[0].poll() is None, logs(run)
        second = subprocess.run(
            [sys.executable, "-m", "ssl_vil.train", "--config", str(RECIPE), "--output-dir", str(run),
             *overrides_for(root / "shards")],
            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
        assert first[0].poll() is None, "the first trainer ended before the second one was refused"
    finally:
        codes = wait_all(first)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert f"error: {run} is being written by another trainer: pid {first[0].pid} on host {socket.gethostname()}" \
        in last, last
    assert "refusing to start a second writer" in last
    assert codes == [0], logs(run)
    _assert_same_as_solo(ref, run)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stale_lock_of_a_sigkilled_trainer_does_not_block_the_resume(solo):
    root, ref = solo
    run = root / "killed"
    procs = launch(run, overrides_for(root / "shards"), fault="kill:step=2,at=after_checkpoint")
    assert wait_all(procs) == [-signal.SIGKILL], logs(run)
    holder = json.loads((run / LOCK_FILE).read_text())
    assert (holder["pid"], holder["host"]) == (procs[0].pid, socket.gethostname())
    assert wait_all(launch(run, overrides_for(root / "shards"))) == [0], logs(run)
    assert "taking over the stale lock" in logs(run)
    assert [r["step"] for r in records(run) if r.get("event") == "resumed"] == [2]
    _assert_same_as_solo(ref, run)


# ------------------------------------------------------------------------------------------ in-process (fast)
def _plant(run_dir: Path, **record: object) -> bytes:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"host": "other-node", "pid": 4242, "pid_start_ticks": 1, "boot_id": "b",
                       "started_utc": "2026-01-01T00:00:00+00:00", "slurm_job_id": None, **record}).encode()
    (run_dir / LOCK_FILE).write_bytes(data)
    return data


def test_lock_held_by_a_live_process_on_this_host_is_refused_until_it_dies(tmp_path):
    child = _lock_in_child(tmp_path)
    try:
        with pytest.raises(RunDirLocked, match=f"pid {child.pid} on host {socket.gethostname()}"):
            RunDirLock(tmp_path).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    lock = RunDirLock(tmp_path)
    lock.acquire()  # the kernel dropped the dead child's lock; its record is stale
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(os.listdir(tmp_path)) == []


def _lock_in_child(run_dir: Path) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from ssl_vil.train.run_dir import "
         "RunDirLock; RunDirLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(600)",
         str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_requeue_on_another_host_takes_over_even_if_the_old_lock_lingers(tmp_path, monkeypatch):
    # NFS can keep a dead node's lock; the record of an earlier attempt of this very Slurm job decides.
    child = _lock_in_child(tmp_path)
    try:
        _plant(tmp_path, slurm_job_id="111")
        monkeypatch.setenv("SLURM_JOB_ID", "222")
        with pytest.raises(RunDirLocked, match="pid 4242 on host other-node, Slurm job 111"):
            RunDirLock(tmp_path).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "111")
        with RunDirLock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert not (tmp_path / LOCK_FILE).exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_same_host_record_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(tmp_path, host=socket.gethostname(), pid=dead.pid, pid_start_ticks=None,
           boot_id=Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with RunDirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_other_host_holder_is_refused_and_its_lock_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "222")
    data = _plant(tmp_path, slurm_job_id="111")
    with pytest.raises(RunDirLocked) as info:
        RunDirLock(tmp_path).acquire()
    msg = str(info.value)
    assert f"{tmp_path} is locked by a trainer on another host: pid 4242 on host other-node, Slurm job 111" in msg
    assert f"delete {tmp_path / LOCK_FILE}" in msg
    assert (tmp_path / LOCK_FILE).read_bytes() == data


def test_requeue_of_the_same_slurm_job_on_another_host_takes_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "111")
    _plant(tmp_path, slurm_job_id="111")
    lock = RunDirLock(tmp_path)
    lock.acquire()
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert (record["host"], record["pid"], record["slurm_job_id"]) == (socket.gethostname(), os.getpid(), "111")
    lock.release()


def test_unreadable_record_is_taken_over(tmp_path):
    tmp_path.joinpath(LOCK_FILE).write_bytes(b"\x00garbage")
    with RunDirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_refused_start_removes_only_the_folders_the_lock_created(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    lock = RunDirLock(run)
    lock.acquire()
    assert sorted(os.listdir(run)) == [LOCK_FILE]
    lock.release(undo_create=True)
    assert os.listdir(tmp_path) == []
    run.mkdir(parents=True)
    lock = RunDirLock(run)
    lock.acquire()
    lock.release(undo_create=True)
    assert run.is_dir() and os.listdir(run) == []
