"""Training metrics: ``metrics.jsonl`` + TensorBoard on rank 0, a progress line every N steps, step timing.

``run_dir/metrics.jsonl`` holds one JSON object per line. A step record looks like::

    {"step": 120, "samples_seen": 7680, "epoch": 0, "time_s": 1.7e9,
     "losses": {"loss": 5.123, "dino": 4.9, "ibot": 0.2, "koleo": -0.03},
     "diagnostics": {"teacher_entropy_ratio": 0.81},
     "lr": 0.0012, "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.04,
     "img_per_s": 98.1, "data_wait_fraction": 0.03, "step_time_s": 0.65, "max_memory_mb": 812.0, ...}

and an event record carries an ``"event"`` field: ``{"event": "skipped_step", "time_s": ..., "step": 7, ...}``.
``step`` counts completed optimizer steps, so the last record of a finished run has ``step == total_steps``.
Python's ``json`` writes non-finite floats as ``NaN`` / ``Infinity`` (a skipped step's loss may be NaN).

On a resume from step S the logger drops every line with ``step > S`` (written after the checkpoint by the
interrupted attempt), so the file never holds a step twice; TensorBoard is told the same through ``purge_step``.

Progress goes to stdout as plain lines (Slurm logs are files, where tqdm's carriage returns are noise); a tqdm bar is
used only when stdout is a TTY, on rank 0 (``TQDM_DISABLE=1`` turns it off).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
ENTROPY_RATIO_KEY = "teacher_entropy_ratio"
TOTAL_LOSS_KEY = "loss"

_RESERVED = frozenset({
    "step", "samples_seen", "epoch", "time_s", "losses", "diagnostics", "img_per_s", "data_wait_fraction",
    "step_time_s", "max_memory_mb", "event",
})


@dataclass(frozen=True)
class StepTiming:
    """Wall-clock totals over a window of steps (seconds, samples summed over the window)."""

    steps: int
    samples: int
    data_wait_s: float
    compute_s: float

    @property
    def step_time_s(self) -> float:
        return (self.data_wait_s + self.compute_s) / self.steps if self.steps else math.nan

    @property
    def img_per_s(self) -> float:
        total_s = self.data_wait_s + self.compute_s
        return self.samples / total_s if total_s > 0 else math.nan

    @property
    def data_wait_fraction(self) -> float:
        total_s = self.data_wait_s + self.compute_s
        return self.data_wait_s / total_s if total_s > 0 else math.nan


class StepTimer:
    """Splits each step's wall time into data wait (until the batch arrives) and compute (the rest).

    ::

        timer.start()
        for batch in loader:            # the wait for ``batch`` counts as data wait
            timer.data_ready()
            ...forward / backward / step...
            timer.step_done(global_batch_size)
            if logger.should_log(step):
                logger.log_step(..., timing=timer.pop_window())

    CUDA work is asynchronous, so single-step compute times are only meaningful once something syncs; over a
    logging window (which ends with a host sync for the loss values) the totals are right.
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
        return StepTiming(self._steps, self._samples, self._data_wait_s, self._compute_s)

    def reset_window(self) -> None:
        self._steps = self._samples = 0
        self._data_wait_s = self._compute_s = 0.0

    def pop_window(self) -> StepTiming:
        timing = self.window()
        self.reset_window()
        return timing


def format_duration(seconds: float) -> str:
    """``252`` -> ``"4m12s"``, ``3720`` -> ``"1h02m"``, ``9`` -> ``"9s"``; ``"?"`` when unknown."""
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


def format_progress(
    step: int,
    total_steps: int,
    *,
    eta_s: float | None,
    img_per_s: float | None,
    data_wait_fraction: float | None,
    losses: Mapping[str, float],
    lr: float | None,
    entropy_ratio: float | None,
) -> str:
    """One progress line, e.g.
    ``step 120/918 (13%) | ETA 4m12s | 98.1 img/s | data-wait 3% | loss 5.123 (dino 4.9 ibot 0.2 koleo -0.03) |
    lr 1.2e-03 | H/lnK 0.81``. Parts whose value is None are left out.
    """
    parts = [f"step {step}/{total_steps} ({100 * step // max(total_steps, 1)}%)"]
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    if img_per_s is not None and math.isfinite(img_per_s):
        parts.append(f"{img_per_s:.1f} img/s")
    if data_wait_fraction is not None and math.isfinite(data_wait_fraction):
        parts.append(f"data-wait {data_wait_fraction:.0%}")
    terms = " ".join(f"{k} {v:.3g}" for k, v in losses.items() if k != TOTAL_LOSS_KEY)
    if TOTAL_LOSS_KEY in losses:
        parts.append(f"loss {losses[TOTAL_LOSS_KEY]:.4g}" + (f" ({terms})" if terms else ""))
    elif terms:
        parts.append(terms)
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if entropy_ratio is not None:
        parts.append(f"H/lnK {entropy_ratio:.2f}")
    return " | ".join(parts)


def max_memory_mb() -> float:
    """Peak memory in MiB: allocated by torch on the current CUDA device if CUDA is in use, else the process's
    peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


class MetricsLogger:
    """Writes ``run_dir/metrics.jsonl``, TensorBoard events under ``run_dir/tb`` and progress lines; rank 0 only.

    On other ranks every method is a no-op, so the trainer can call it unconditionally with globally reduced
    values. ``start_step`` is the step the run (re)starts from: lines after it are dropped on open.
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        *,
        log_every_steps: int,
        total_steps: int,
        tensorboard: bool = True,
        start_step: int = 0,
    ) -> None:
        if log_every_steps < 1:
            raise ValueError(f"MetricsLogger log_every_steps must be >= 1, got {log_every_steps}")
        if total_steps < 1:
            raise ValueError(f"MetricsLogger total_steps must be >= 1, got {total_steps}")
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.log_every_steps = log_every_steps
        self.total_steps = total_steps
        self.tensorboard = tensorboard
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._tb = None
        self._tb_purge_step: int | None = start_step + 1 if start_step > 0 else None
        self._bar = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.truncate_after(start_step)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most the current line
        if sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout)

    @property
    def active(self) -> bool:
        return self.rank == 0

    def should_log(self, step: int) -> bool:
        """True every ``log_every_steps`` steps and at the last step."""
        return step % self.log_every_steps == 0 or step == self.total_steps

    def log_step(
        self,
        step: int,
        *,
        samples_seen: int,
        epoch: int,
        losses: Mapping[str, float | torch.Tensor],
        diagnostics: Mapping[str, float | torch.Tensor] | None = None,
        schedules: Mapping[str, float] | None = None,
        timing: StepTiming | None = None,
        **scalars: float,
    ) -> dict[str, Any] | None:
        """Append one step record (and TensorBoard scalars); print the progress line if :meth:`should_log`.

        Args:
            losses: objective outputs by name; ``"loss"`` is the total (``{"loss", "dino", "ibot", "koleo"}``).
            diagnostics: e.g. ``{"teacher_entropy_ratio": 0.81}`` (shown as ``H/lnK`` in the progress line).
            schedules: schedule values at this step, stored top-level (``lr``, ``wd``, ``momentum``, ``teacher_temp``).
            timing: the :class:`StepTimer` window since the last logged step.
            scalars: any further top-level scalars (e.g. ``knn_top1``).

        Returns the record written (None on ranks other than 0).
        """
        if not self.active:
            return None
        schedules = dict(schedules or {})
        clashes = (set(schedules) | set(scalars)) & _RESERVED or set(schedules) & set(scalars)
        if clashes:
            raise ValueError(f"MetricsLogger.log_step: key(s) {sorted(clashes)} clash with reserved or repeated keys")
        record: dict[str, Any] = {
            "step": step,
            "samples_seen": samples_seen,
            "epoch": epoch,
            "time_s": round(time.time(), 3),
            "losses": {k: float(v) for k, v in losses.items()},
            "diagnostics": {k: float(v) for k, v in (diagnostics or {}).items()},
            **{k: float(v) for k, v in schedules.items()},
        }
        if timing is not None and timing.steps:
            record.update(img_per_s=timing.img_per_s, data_wait_fraction=timing.data_wait_fraction,
                          step_time_s=timing.step_time_s)
        record["max_memory_mb"] = round(max_memory_mb(), 1)
        record.update(scalars)
        self._write(record)
        self._write_tensorboard(record, schedules, scalars)

        if self.should_log(step):
            eta_s = None
            if timing is not None and timing.steps:
                eta_s = timing.step_time_s * max(self.total_steps - step, 0)
            line = format_progress(
                step, self.total_steps, eta_s=eta_s,
                img_per_s=record.get("img_per_s"), data_wait_fraction=record.get("data_wait_fraction"),
                losses=record["losses"], lr=schedules.get("lr"),
                entropy_ratio=record["diagnostics"].get(ENTROPY_RATIO_KEY),
            )
            if self._bar is not None:
                self._bar.update(step - self._bar.n)
                self._bar.set_postfix_str(line.split(" | ", 2)[-1], refresh=True)
            else:
                print(line, flush=True)
        return record

    def log_event(self, kind: str, **fields: Any) -> dict[str, Any] | None:
        """Append a one-off event (data error counts, fallback, skipped step, ...) and print it."""
        if not self.active:
            return None
        if "event" in fields or "time_s" in fields:
            raise ValueError("MetricsLogger.log_event: 'event' and 'time_s' are set by the logger")
        record = {"event": kind, "time_s": round(time.time(), 3), **fields}
        self._write(record)
        line = f"event {kind}: " + " ".join(f"{k}={v}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        return record

    def truncate_after(self, step: int) -> int:
        """Drop every line with ``"step" > step``, step-less lines after the first dropped one, and unparsable
        lines (a line cut short by a crash). Rewrites the file atomically; returns the number of lines dropped."""
        if not self.active or not self.path.exists():
            return 0
        was_open = self._file is not None
        if was_open:
            self._file.close()
        kept, dropped, past_resume_point = [], 0, False
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            record_step = record.get("step")
            if record_step is not None and record_step > step:
                past_resume_point = True
            if past_resume_point and (record_step is None or record_step > step):
                dropped += 1
                continue
            kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.path)
        if dropped:
            log.info("%s: dropped %d line(s) after step %d from an earlier attempt", self.path, dropped, step)
        if was_open:
            self._file = open(self.path, "a", buffering=1)
        # TensorBoard keeps its own files: ask the next writer to hide events after `step`.
        self._tb_purge_step = step + 1
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        return dropped

    def _write(self, record: Mapping[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record, default=_json_default) + "\n")

    def _write_tensorboard(self, record: Mapping[str, Any], schedules: Mapping[str, float],
                           scalars: Mapping[str, Any]) -> None:
        if not self.tensorboard:
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only rank 0 with TensorBoard pays

            self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=self._tb_purge_step)
        step = record["step"]
        tags = {
            **{f"loss/{k}": v for k, v in record["losses"].items()},
            **{f"diag/{k}": v for k, v in record["diagnostics"].items()},
            **{f"schedule/{k}": v for k, v in schedules.items()},
            **{f"perf/{k}": record[k] for k in ("img_per_s", "data_wait_fraction", "step_time_s", "max_memory_mb")
               if k in record},
            **{k: v for k, v in scalars.items() if isinstance(v, (int, float))},
        }
        for tag, value in tags.items():
            self._tb.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
