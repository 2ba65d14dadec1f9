"""Hang watchdog: if the step loop stops making progress, dump every thread's stack and exit.

A rank stuck in a collective (a peer died or sleeps), a deadlocked DataLoader or a stalled filesystem otherwise
holds the whole job until the Slurm walltime. The watchdog is a daemon thread that expects :meth:`HangWatchdog.beat`
every step; after ``timeout_s`` without one it writes all Python stacks to ``run_dir/hang_rank{rank}.txt`` (and
stderr) and ends the process with ``os._exit(exit_code)``: no cleanup that could block again. Ranks waiting on the
stuck one stop beating too, so every rank leaves a dump showing where it waited.

The thread needs the GIL to run; a hang inside C code that holds the GIL is not caught here (collectives and
``time.sleep`` release it; NCCL's own timeout covers the rest).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from ssl_vil.infra.hard_exit import exit_now

HANG_EXIT_CODE = 86


class HangWatchdog:
    """Daemon thread that kills the process after ``timeout_s`` seconds without a :meth:`beat`.

    The clock starts at :meth:`start`, so ``timeout_s`` must cover the slowest step, including the first one
    (compilation, autotuning, data warm-up). Wrap long non-step work (evaluation, checkpoint export) in
    :meth:`paused`.
    """

    def __init__(self, timeout_s: float, run_dir: Path, rank: int, exit_code: int = HANG_EXIT_CODE) -> None:
        if not timeout_s > 0:
            raise ValueError(f"HangWatchdog timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.exit_code = exit_code
        self.dump_path = self.run_dir / f"hang_rank{rank}.txt"
        # Plain attribute writes from the step loop; the GIL makes each one atomic.
        self._last_beat_s = time.monotonic()
        self._last_step: int | None = None
        self._paused = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("HangWatchdog.start() called twice")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._last_beat_s = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name=f"hang-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        """Record progress; call once per step."""
        self._last_beat_s = time.monotonic()
        self._last_step = step

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Suspend the timeout for work that is not a training step (evaluation, export)."""
        self._paused = True
        try:
            yield
        finally:
            self._last_beat_s = time.monotonic()
            self._paused = False

    def _watch(self) -> None:
        # Check often enough that the detection latency is a small fraction of the timeout.
        interval_s = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(interval_s):
            if self._paused:
                continue
            silent_s = time.monotonic() - self._last_beat_s
            if silent_s > self.timeout_s:
                self._dump_and_exit(silent_s)

    def _dump_and_exit(self, silent_s: float) -> None:
        header = (
            f"hang watchdog: rank {self.rank} pid {os.getpid()} made no progress for {silent_s:.1f} s "
            f"(timeout {self.timeout_s:g} s); last completed step: {self._last_step}; "
            f"exiting with code {self.exit_code}\n"
            f"time: {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
        )
        with open(self.dump_path, "w") as f:
            f.write(header)
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        with contextlib.suppress(Exception):  # stderr may be closed or redirected to something without a fileno
            sys.stderr.write(header)
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        exit_now(self.exit_code)
