"""Preemption: a signal sets a flag, and all ranks agree on it at the next step boundary.

Slurm sends ``--signal`` (SIGUSR2 by default with submitit) and SIGTERM to the job's processes, not necessarily
to all ranks at the same moment. Saving inside the handler is the failure mode of Lightning #21406: the handler
interrupts arbitrary code (a collective, a half-written file) on one rank only. Here the handler only stores the
signal number; the trainer's step guard (``ssl_vil.train.step_guard``) carries :meth:`PreemptionFlag.is_set_locally`
in its one per-step all-reduce (standalone users call :meth:`PreemptionFlag.should_stop`, which MAX-all-reduces
the flag), so every rank sees True at the same step, saves that same step, and exits with
:data:`REQUEUE_EXIT_CODE`.

While the flag is installed it replaces the handlers that were there before, including submitit's
``checkpoint_and_try_requeue`` handler for SIGUSR2 (which would requeue from rank 0 alone, inside the handler).
:meth:`PreemptionFlag.uninstall` restores them. The Slurm launcher relies on the trainer saving and exiting with
:data:`REQUEUE_EXIT_CODE`, and requeues the job when it sees that code.

Ctrl-C (SIGINT, with ``interrupt=True``) stops the same way, at the next step boundary with a save, but it is the
user's stop, not a preemption: the trainer exits with :data:`INTERRUPT_EXIT_CODE`, which no launcher requeues.
A second SIGINT exits at once, without saving. The trainer's DataLoader workers ignore all of these signals
(``ssl_vil.data.workers.WORKER_IGNORED_SIGNALS``): a Ctrl-C reaches the whole foreground process group.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

# The exit statuses of a run saved for a requeue / stopped by Ctrl-C (torch-free, shared with the CLI).
from ssl_vil.infra.exit_codes import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE
from ssl_vil.infra.hard_exit import exit_now

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGTERM)

_FIRST_INTERRUPT_NOTICE = (b"interrupted: saving a checkpoint at the end of this step; "
                           b"press Ctrl-C again to exit now without saving\n")
_SECOND_INTERRUPT_NOTICE = b"interrupted again: exiting now without saving (exit code 130)\n"

_Handler = Callable[[int, FrameType | None], Any] | int | None


class PreemptionFlag:
    """Records that a preemption signal arrived; :meth:`should_stop` makes the decision global.

    Usage::

        flag = PreemptionFlag()
        flag.install()
        for step in ...:
            ...
            if flag.should_stop():      # same answer on every rank
                save(step); sys.exit(REQUEUE_EXIT_CODE)
        flag.uninstall()
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, device: torch.device | str | None = None, *,
                 interrupt: bool = False, announce: bool = True) -> None:
        """``device`` holds the all-reduced flag; None picks the current CUDA device for NCCL and CPU otherwise.

        ``interrupt``: also handle SIGINT (stop at the step boundary; a second one exits at once with
        :data:`INTERRUPT_EXIT_CODE`). ``announce``: say so on stderr when the first SIGINT arrives (one rank).
        """
        self.signals = tuple(signals)
        self.device = None if device is None else torch.device(device)
        self.interrupt = interrupt
        self.announce = announce
        # Number of the last signal received; 0 = none. Written by the handler, read by the step loop.
        self.signum = 0
        # A SIGINT arrived: the stop is the user's, not a preemption.
        self.interrupted = False
        self._pid = os.getpid()
        self._previous: dict[int, _Handler] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only an attribute store: no I/O, logging, locks or allocation, so it is safe wherever the main thread
        # was interrupted (tests/test_guards_preemption.py checks the bytecode calls nothing).
        self.signum = signum

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        # Writes go straight to fd 2 (os.write): a buffered stream or a logging lock may be what was interrupted.
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker before its init function ignores SIGINT: the parent handles it
        if self.interrupted:
            os.write(2, _SECOND_INTERRUPT_NOTICE)
            # At once: no cleanup that could block (worker joins, collectives); the workers are killed first so none
            # prints a connection-reset traceback after this notice. The run dir lock is released by
            # the kernel with the process, and checkpoints are written atomically, so nothing is left half-done.
            exit_now(INTERRUPT_EXIT_CODE)
        self.interrupted = True
        self.signum = signum
        if self.announce:
            os.write(2, _FIRST_INTERRUPT_NOTICE)

    def install(self) -> None:
        """Install the handler for each signal, keeping the previous handlers for :meth:`uninstall`."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionFlag.install() must run in the main thread (Python delivers signals there)")
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.interrupt and signal.SIGINT not in self._previous:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

    def uninstall(self) -> None:
        """Restore the handlers that were installed before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def is_set_locally(self) -> bool:
        """True when this process has received one of the signals (no communication)."""
        return self.signum != 0

    def should_stop(self) -> bool:
        """True on every rank when any rank has received a signal. A collective: call it on all ranks, once per step."""
        local = self.signum != 0
        if not (dist.is_available() and dist.is_initialized()):
            return local
        device = self.device
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
                torch.device("cpu")
        # int32: NCCL cannot reduce bool.
        flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def ignore_in_worker(worker_id: int = 0, signals: Sequence[int] = DEFAULT_SIGNALS) -> None:
    """DataLoader ``worker_init_fn``: ignore the preemption signals in worker processes.

    Slurm signals every process of the step, DataLoader workers included; by default they would die and take the
    rank down before it can save. The main process handles the signal and shuts the workers down itself. A loop
    whose flag handles Ctrl-C (``interrupt=True``) passes ``(*DEFAULT_SIGNALS, signal.SIGINT)``: a Ctrl-C reaches
    the workers too.
    """
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def stop_exit_code(preempt: PreemptionFlag) -> int:
    """INTERRUPT_EXIT_CODE on every rank when any rank got a Ctrl-C (the user's stop, never requeued), else
    REQUEUE_EXIT_CODE. Collective, once, at the step where every rank stops."""
    from ssl_vil.infra.dist import all_reduce_scalar, is_distributed

    interrupted = int(preempt.interrupted)
    if is_distributed():
        interrupted = all_reduce_scalar(interrupted, "max")
    return INTERRUPT_EXIT_CODE if interrupted else REQUEUE_EXIT_CODE
