"""Step timing (data wait vs compute, throughput), human-readable durations, and the cadence of periodic actions."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


def is_due(step: int, every_steps: int, *, total_steps: int | None = None) -> bool:
    """Whether a periodic action runs after ``step``: every ``every_steps`` steps, and at ``total_steps`` (the
    final step) when that is given. ``every_steps <= 0`` means never, the final step included."""
    if every_steps <= 0:
        return False
    return step % every_steps == 0 or (total_steps is not None and step == total_steps)


def format_duration(seconds: float) -> str:
    """``252`` -> ``"4m12s"``, ``3720`` -> ``"1h02m"``, ``9`` -> ``"9s"``; ``"?"`` when unknown (NaN, negative)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


@dataclass(frozen=True)
class StepTiming:
    """Wall-clock totals over a window of steps (seconds, samples summed over the window)."""

    steps: int
    samples: int
    data_wait_s: float
    compute_s: float

    @property
    def total_s(self) -> float:
        return self.data_wait_s + self.compute_s

    @property
    def step_time_s(self) -> float:
        return self.total_s / self.steps if self.steps else math.nan

    @property
    def img_per_s(self) -> float:
        return self.samples / self.total_s if self.total_s > 0 else math.nan

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_s / self.total_s if self.total_s > 0 else math.nan

    def eta_s(self, steps_left: int) -> float:
        """Time for ``steps_left`` more steps at this window's pace (NaN for an empty window)."""
        return self.step_time_s * max(steps_left, 0)


class StepTimer:
    """Splits each step's wall time into data wait (until the batch arrives) and compute (the rest).

    ::

        timer.start()
        for batch in loader:            # the wait for ``batch`` counts as data wait
            timer.data_ready()
            ...forward / backward / step...
            timer.step_done(global_batch_size)
            if is_due(step, log_every):
                log(..., timing=timer.pop_window())

    Call :meth:`start` again after anything that is neither (evaluation, checkpointing). CUDA work is
    asynchronous, so single-step compute times are only meaningful once something syncs; over a logging window
    (which ends with a host sync for the loss values) the totals are right.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._mark = clock()
        self._data_at: float | None = None
        self.reset_window()

    def start(self) -> None:
        """Restart the clock (e.g. after evaluation or checkpointing) and clear the window."""
        self._mark = self._clock()
        self._data_at = None
        self.reset_window()

    def data_ready(self) -> None:
        """The step's batch has arrived: the time since the last mark was data wait."""
        self._data_at = self._clock()
        self._data_wait_s += self._data_at - self._mark

    def step_done(self, samples: int) -> None:
        """``samples``: images the step consumed on all ranks together, so ``img_per_s`` is the job's throughput."""
        if self._data_at is None:
            raise RuntimeError("StepTimer.step_done() without data_ready() for this step")
        now = self._clock()
        self._compute_s += now - self._data_at
        self._steps += 1
        self._samples += samples
        self._mark, self._data_at = now, None

    def window(self) -> StepTiming:
        """Totals since the last :meth:`pop_window` / :meth:`start`."""
        return StepTiming(self._steps, self._samples, self._data_wait_s, self._compute_s)

    def reset_window(self) -> None:
        self._steps = self._samples = 0
        self._data_wait_s = self._compute_s = 0.0

    def pop_window(self) -> StepTiming:
        """The window's totals, and a new window."""
        timing = self.window()
        self.reset_window()
        return timing
