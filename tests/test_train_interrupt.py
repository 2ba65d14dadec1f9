"""Ctrl-C: the trainer saves at the next step boundary and exits 130 with a resume line; a second Ctrl-C exits at
once. Real trainer processes in their own process group, real SIGINTs (to the group, as a terminal sends them,
or to the trainer alone)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import textwrap

import pytest

import faultinject
from ssl_vil.train.cli import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE
from trainer_harness import RECIPE, ROOT, assert_tree_equal, final_payload, losses, tiny_overrides, write_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 24
STOP_AFTER = 6  # the signal is sent once this many steps are logged
PROMPT_S = 8.0  # from the SIGINT to the exit: the rest of one step, one save, the worker shutdown


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()),
               default=0)


def _command(run: Path, overrides: list[str]) -> list[str]:
    return ["-m", "ssl_vil.train", "--config", str(RECIPE), "--output-dir", str(run), *overrides]


def _start(run: Path, overrides: list[str], fault: str | None = None) -> subprocess.Popen:
    """One trainer in a new process group (the group a terminal's Ctrl-C reaches), stderr to ``RUN.err``."""
    env = faultinject.child_env(dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0"), fault=fault)
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    run.parent.mkdir(parents=True, exist_ok=True)
    err = open(run.parent / f"{run.name}.err", "ab")
    return subprocess.Popen([sys.executable, *_command(run, overrides)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=err, process_group=0)


def _stderr(run: Path) -> str:
    return (run.parent / f"{run.name}.err").read_text(errors="replace")


def _wait_steps(proc: subprocess.Popen, run: Path, steps: int) -> None:
    deadline = time.monotonic() + 240
    while _logged_steps(run) < steps:
        assert proc.poll() is None, _stderr(run)
        assert time.monotonic() < deadline, "the trainer did not reach the step"
        time.sleep(0.02)


def _wait_exit(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """(exit code, seconds it took); the process is killed if it overruns."""
    start = time.monotonic()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the trainer did not exit within {timeout:.0f} s of the interrupt") from None
    return code, time.monotonic() - start


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (DataLoader workers included)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def _wait_group_gone(pgid: int, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while _live_group_members(pgid):
        if time.monotonic() > deadline:
            members = _live_group_members(pgid)
            for pid in members:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes of the trainer's group still alive: {members}")
        time.sleep(0.05)


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


def _events(run: Path) -> list[tuple[str, int]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["event"], r.get("step")) for r in records if "event" in r]


def _resume_line(run: Path, overrides: list[str], why: str = "interrupted") -> str:
    return f"{why}: checkpoint saved; resume with: " + shlex.join(["python", *_command(run, overrides)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards and one uninterrupted reference run (the stream's batches do not depend on the worker count)."""
    root = tmp_path_factory.mktemp("interrupt")
    write_shards(root / "shards")

    def overrides(workers: int) -> list[str]:
        return tiny_overrides(root / "shards", total_steps=STEPS, workers=workers) + ["checkpoint.every_steps=100"]

    ref = root / "ref"
    proc = _start(ref, overrides(2))
    assert proc.wait(timeout=400) == 0, _stderr(ref)
    return root, overrides, ref


def _interrupt_and_check(run: Path, overrides: list[str], *, to_group: bool) -> int:
    """Start, SIGINT after STOP_AFTER steps, check the stop; returns the step it saved."""
    proc = _start(run, overrides)
    _wait_steps(proc, run, STOP_AFTER)
    if to_group:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the trainer and its workers
    else:
        os.kill(proc.pid, signal.SIGINT)
    code, took = _wait_exit(proc, timeout=60)
    err = _stderr(run)
    assert code == INTERRUPT_EXIT_CODE, err
    assert took < PROMPT_S, f"{took:.1f} s from SIGINT to exit"
    _wait_group_gone(proc.pid)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1] == _resume_line(run, overrides), lines[-3:]
    assert sum("interrupted: saving a checkpoint at the end of this step" in line for line in lines) == 1
    saved = _checkpoint_steps(run)
    assert len(saved) == 1 and STOP_AFTER <= saved[0] < STEPS, saved  # one save, at the step it stopped
    assert _logged_steps(run) == saved[0]  # not one step past it
    assert _events(run)[-1] == ("interrupted", saved[0])
    return saved[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_to_the_group_saves_exits_130_and_the_printed_command_resumes_bitwise(setup, workers):
    root, overrides, ref = setup
    run = root / f"group_w{workers}"
    stopped = _interrupt_and_check(run, overrides(workers), to_group=True)

    # Resume with exactly the printed command.
    argv = shlex.split(_stderr(run).strip().splitlines()[-1].split("resume with: ", 1)[1])
    assert argv[:3] == ["python", "-m", "ssl_vil.train"]
    env = faultinject.child_env(dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0"))
    done = subprocess.run([sys.executable, *argv[1:]], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("resumed", stopped) in _events(run)
    assert losses(run) == losses(ref)  # bitwise: no step lost or repeated
    assert_tree_equal(final_payload(ref)["objective"], final_payload(run)["objective"], "objective")
    assert_tree_equal(final_payload(ref)["optimizer"], final_payload(run)["optimizer"], "optimizer")


def test_sigint_to_the_trainer_alone_stops_promptly(setup):
    root, overrides, _ = setup
    _interrupt_and_check(root / "alone", overrides(2), to_group=False)


def test_second_ctrl_c_exits_at_once_without_saving(setup):
    root, overrides, _ = setup
    run = root / "double"
    # The trainer stalls before step index 8 (a long step), so the first Ctrl-C cannot reach its step boundary.
    proc = _start(run, overrides(2), fault="sleep:step=8,secs=120")
    _wait_steps(proc, run, 8)
    os.killpg(proc.pid, signal.SIGINT)
    notice = "interrupted: saving a checkpoint at the end of this step; press Ctrl-C again to exit now without saving"
    deadline = time.monotonic() + 20
    while notice not in _stderr(run):  # the handler has run: the next SIGINT is a second one, not merged into it
        assert time.monotonic() < deadline and proc.poll() is None, _stderr(run)
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    code, took = _wait_exit(proc, timeout=30)
    assert code == INTERRUPT_EXIT_CODE
    assert took < 2.0, f"{took:.1f} s from the second SIGINT to exit"
    _wait_group_gone(proc.pid)
    err = _stderr(run)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = err.strip().splitlines()
    assert lines[-2:] == [notice, "interrupted again: exiting now without saving (exit code 130)"]
    assert _checkpoint_steps(run) == []  # nothing saved, and the next start resumes from nothing
    assert "resume with" not in err


def test_sigterm_keeps_requeue_exit_and_ends_with_the_resume_line(setup):
    root, overrides, _ = setup
    run = root / "term"
    proc = _start(run, overrides(2))
    _wait_steps(proc, run, STOP_AFTER)
    proc.send_signal(signal.SIGTERM)
    code, took = _wait_exit(proc, timeout=60)
    err = _stderr(run)
    assert code == REQUEUE_EXIT_CODE and took < PROMPT_S, err
    assert "Traceback" not in err and "interrupted" not in err, err
    assert err.strip().splitlines()[-1] == _resume_line(run, overrides(2), why="preempted")
    saved = _checkpoint_steps(run)
    assert len(saved) == 1 and _events(run)[-1] == ("preempted", saved[0])


EXIT_WITH_LIVE_WORKERS = textwrap.dedent(
    """
    import sys
    import numpy as np, torch
    from synthetic_shards import write_synthetic_shards
    from ssl_vil.data import build_eval_stream

    write_synthetic_shards(sys.argv[1], [8, 8])
    view = lambda image: torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    batches = iter(build_eval_stream(sys.argv[1], batch_size=2, rank=0, world_size=1, transform=view, num_workers=2))
    next(batches)  # the loader's iterator, and its two workers, are alive when the interpreter exits
    """
)


def test_interpreter_exit_does_not_wait_for_workers_that_ignore_sigterm(tmp_path):
    """Workers ignore SIGTERM / SIGINT; multiprocessing's exit handler would SIGTERM them and join without a
    timeout, so an iterator still alive at exit (one held by a traceback, say) must not hang the process."""
    script = tmp_path / "exit_live.py"
    script.write_text(EXIT_WITH_LIVE_WORKERS)
    env = faultinject.child_env(dict(os.environ, OMP_NUM_THREADS="1"))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "shards")], env=env, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, process_group=0)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("the process hung at exit on its DataLoader workers") from None
    assert proc.returncode == 0 and "Traceback" not in err, err
    _wait_group_gone(proc.pid)
