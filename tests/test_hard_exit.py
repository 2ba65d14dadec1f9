"""exit_now: the process ends with the given code and takes its multiprocessing children with it."""

import os
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys, time
    from ssl_vil.infra.hard_exit import exit_now

    def child():
        time.sleep(300)

    if __name__ == "__main__":
        ctx = multiprocessing.get_context(sys.argv[1])
        procs = [ctx.Process(target=child) for _ in range(2)]
        for p in procs:
            p.start()
        print(" ".join(str(p.pid) for p in procs), flush=True)
        exit_now(7)
        print("not reached", flush=True)
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_exit_now_kills_children_and_exits_with_the_code(tmp_path):
    script = tmp_path / "hard_exit.py"
    script.write_text(SCRIPT)
    for method in ("fork", "spawn"):
        out = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=60)
        assert out.returncode == 7, out.stderr
        assert "not reached" not in out.stdout
        pids = [int(p) for p in out.stdout.split()]
        assert len(pids) == 2
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids), f"{method}: children outlived exit_now: {pids}"
        assert out.stderr == "", out.stderr
