"""PreemptionFlag: a signal to one rank stops all ranks at the same step (real 2-process gloo, real signals).

The multi-process test runs this file as a script (``python test_guards_preemption.py preempt_worker RANK ...``).
"""

from __future__ import annotations

import dis
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from faultinject import ENV_VAR, maybe_inject_signal
from ssl_vil.train.preemption import REQUEUE_EXIT_CODE, PreemptionFlag, ignore_in_worker

INJECTED_STEP = 7
MAX_STEPS = 3000


def stop_loop(flag: PreemptionFlag, rank: int, inject: bool) -> dict:
    """A step loop that polls the flag at every step boundary, as the trainer does."""
    for step in range(1, MAX_STEPS + 1):
        time.sleep(0.005)  # the "step"
        if inject:
            maybe_inject_signal(step, rank)
        if flag.should_stop():
            return {"step": step, "signum": flag.signum, "local": flag.is_set_locally()}
    return {"step": None}


def preempt_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    out = Path(out_dir)
    # Phase 1: the fault `signal:step=7,rank=1` (set in the environment by the test) signals rank 1 itself.
    with PreemptionFlag() as flag:
        injected = stop_loop(flag, rank, inject=True)
    # Phase 2: the test sends SIGUSR2 to rank 1's pid from outside once both ranks are in the loop.
    flag = PreemptionFlag()
    flag.install()
    (out / f"ready{rank}").write_text(str(os.getpid()))
    external = stop_loop(flag, rank, inject=False)
    flag.uninstall()
    (out / f"stopped_rank{rank}.json").write_text(json.dumps({"injected": injected, "external": external}))
    from ssl_vil.infra.dist import leave_group
    leave_group()  # all ranks together
    sys.exit(REQUEUE_EXIT_CODE if external["step"] is not None else 1)


@pytest.mark.slow
def test_signal_to_one_rank_stops_both_at_same_step(tmp_path):
    env = {**os.environ, ENV_VAR: f"signal:step={INJECTED_STEP},rank=1"}
    procs = [
        subprocess.Popen([sys.executable, __file__, "preempt_worker", str(r), "2", str(tmp_path / "store"),
                          str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for r in range(2)
    ]
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
            assert time.monotonic() < deadline, "workers did not reach the step loop"
            time.sleep(0.05)
        time.sleep(0.3)  # both ranks are now mid-loop
        os.kill(int((tmp_path / "ready1").read_text()), signal.SIGUSR2)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [REQUEUE_EXIT_CODE] * 2, outs
    r0, r1 = (json.loads((tmp_path / f"stopped_rank{r}.json").read_text()) for r in range(2))

    assert r0["injected"] == {"step": INJECTED_STEP, "signum": 0, "local": False}
    assert r1["injected"] == {"step": INJECTED_STEP, "signum": int(signal.SIGUSR2), "local": True}

    assert r0["external"]["step"] == r1["external"]["step"]
    assert r0["external"]["step"] > 1
    assert (r0["external"]["signum"], r0["external"]["local"]) == (0, False)
    assert (r1["external"]["signum"], r1["external"]["local"]) == (int(signal.SIGUSR2), True)


def test_handler_calls_nothing():
    """The handler may only store the signal number: no call means no I/O, logging, locks or allocation."""
    instructions = list(dis.get_instructions(PreemptionFlag._on_signal))
    assert not [i.opname for i in instructions if "CALL" in i.opname or i.opname.startswith("IMPORT")]
    assert [i.argval for i in instructions if i.opname == "STORE_ATTR"] == ["signum"]
    flag = PreemptionFlag()
    flag._on_signal(int(signal.SIGTERM), None)
    assert flag.signum == signal.SIGTERM and flag.is_set_locally()


def test_real_signal_sets_flag_and_uninstall_restores_previous_handler():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    flag = PreemptionFlag()
    flag.install()
    try:
        assert signal.getsignal(signal.SIGUSR2) == flag._on_signal
        assert not flag.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signum == signal.SIGTERM
        assert flag.should_stop()  # no process group: the local flag decides
    finally:
        flag.uninstall()
    assert {sig: signal.getsignal(sig) for sig in previous} == previous


def test_fault_injection_fires_only_at_its_step_and_rank(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "signal:step=3,rank=0")
    with PreemptionFlag() as flag:
        fired = []
        for step in range(6):
            assert not maybe_inject_signal(step, rank=1)
            if maybe_inject_signal(step, rank=0):
                fired.append(step)
                assert flag.is_set_locally()
            else:
                assert flag.is_set_locally() == (step > 3)
    assert fired == [3]
    assert flag.signum == signal.SIGUSR2


def test_fault_with_unknown_signal_name_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "signal:step=1,sig=USR9")
    with pytest.raises(ValueError, match="unknown signal 'USR9'"):
        maybe_inject_signal(1, rank=0)


def test_ignore_in_worker_ignores_preemption_signals():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        ignore_in_worker(0)
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in previous)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    globals()[sys.argv[1]](int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
