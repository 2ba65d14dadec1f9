"""The one step loop that every training entry point drives: pretraining, fine-tuning and segmentation.

::

    while progress.step < total_steps:
        batch   = next(batches)                      # the wait for it is the step's data wait
        verdict = step(batch)                        # forward, backward, the step guard's decision, optimizer
        log_step(batch, verdict, timer)
        for action in periodic: action if due        # k-NN monitor, validation
        checkpointer.save(progress) if due or stop   # the checkpointer's own cadence
        if verdict.stop: return the stop exit code   # preemption / Ctrl-C: requeue or interrupt

What differs between the entry points is injected; the order is the loop's: an action of step ``s`` runs before
the checkpoint of step ``s``, so a run resumed from that checkpoint neither repeats nor skips it. The loop counts
the step (``progress.step``, ``progress.samples_seen``) once the step function returns, so the step function sees
the index of the step it takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ssl_vil.infra.timing import StepTimer
from ssl_vil.train.checkpointing import Progress
from ssl_vil.train.preemption import INTERRUPT_EXIT_CODE, PreemptionFlag, stop_exit_code
from ssl_vil.train.step_guard import Verdict
from ssl_vil.train.watchdog import HangWatchdog


@dataclass(frozen=True)
class Periodic:
    """An action after a step: ``run(step, batch)`` whenever ``due(step, batch)``."""

    due: Callable[[int, Any], bool]
    run: Callable[[int, Any], None]


class Saves(Protocol):
    """What the loop needs of a checkpointer (:class:`ssl_vil.train.checkpointing.Checkpointer`)."""

    def due(self, step: int, batch: Any = None, *, stop: bool = False) -> bool: ...

    def save(self, progress: Progress) -> Any: ...


def run_steps(batches: Iterator[Any], *, progress: Progress, total_steps: int,
              step: Callable[[Any], tuple[Verdict, int]], log_step: Callable[[Any, Verdict, StepTimer], None],
              checkpointer: Saves, preempt: PreemptionFlag, on_stop: Callable[[str, int], None],
              periodic: Sequence[Periodic] = (), watchdog: HangWatchdog | None = None) -> int:
    """Train from ``progress`` to ``total_steps``; 0 when done, else the exit code of a stop (after its save).

    ``step(batch)`` returns the verdict and the images the step consumed on all ranks; ``on_stop(event, code)``
    records a stop (``event`` is ``"preempted"`` or ``"interrupted"``). The watchdog, if any, is beaten once per
    step and paused around the periodic actions and the saves.
    """
    paused = watchdog.paused if watchdog is not None else contextlib.nullcontext
    timer = StepTimer()
    timer.start()
    while progress.step < total_steps:
        if watchdog is not None:
            watchdog.beat(progress.step)
        batch = next(batches)
        timer.data_ready()
        verdict, images = step(batch)
        progress.step += 1
        progress.samples_seen += images
        timer.step_done(images)
        log_step(batch, verdict, timer)
        for action in periodic:
            if action.due(progress.step, batch):
                with paused():
                    action.run(progress.step, batch)
                timer.start()
        if checkpointer.due(progress.step, batch, stop=verdict.stop):
            with paused():
                checkpointer.save(progress)
            timer.start()
        if verdict.stop:
            code = stop_exit_code(preempt)
            on_stop("interrupted" if code == INTERRUPT_EXIT_CODE else "preempted", code)
            return code
    return 0
