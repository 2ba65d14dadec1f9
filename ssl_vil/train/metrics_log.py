"""Training metrics: ``metrics.jsonl`` + TensorBoard on rank 0, a progress line every N steps, step timing.

``run_dir/metrics.jsonl`` holds one JSON object per line. A step record looks like::

    {"step": 120, "samples_seen": 7680, "epoch": 0, "time_s": 1.7e9,
     "losses": {"loss": 5.123, "dino": 4.9, "ibot": 0.2, "koleo": -0.03},
     "diagnostics": {"teacher_entropy_ratio": 0.81},
     "lr": 0.0012, "weight_decay": 0.04, "ema_momentum": 0.996, "teacher_temp": 0.04,
     "img_per_s": 98.1, "data_wait_fraction": 0.03, "step_time_s": 0.65, "max_memory_mb": 812.0, ...}

and an event record carries an ``"event"`` field: ``{"event": "skipped_step", "time_s": ..., "step": 7, ...}``.
The in-training k-NN monitor's results are ``knn`` events (``{"event": "knn", "step": 500, "knn_top1": 71.2,
"knn_top1_k20": 71.2, "knn_top5_k20": 93.0, ...}``); their accuracies also go to TensorBoard as ``knn/top1``,
``knn/top1_k20``, ``knn/top5_k20``.
``step`` counts completed optimizer steps, so the last record of a finished run has ``step == total_steps``.
Python's ``json`` writes non-finite floats as ``NaN`` / ``Infinity`` (a skipped step's loss may be NaN).

On a resume from step S the logger cuts the file back to what was written up to step S (the rule of
:meth:`ssl_vil.infra.files.JsonlLog.truncate_after`), so the file never holds a step twice; TensorBoard is told
the same through ``purge_step``. Step timing and durations come from :mod:`ssl_vil.infra.timing`.

Progress goes to stdout as plain lines (Slurm logs are files, where tqdm's carriage returns are noise); a tqdm bar is
used only when stdout is a TTY, on rank 0 (``TQDM_DISABLE=1`` turns it off).
"""

from __future__ import annotations

import math
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ssl_vil.infra.files import JsonlLog
from ssl_vil.infra.timing import StepTiming, format_duration, is_due
from ssl_vil.train.scalar_board import ScalarBoard

METRICS_FILE = "metrics.jsonl"
ENTROPY_RATIO_KEY = "teacher_entropy_ratio"
TOTAL_LOSS_KEY = "loss"
KNN_EVENT = "knn"
# The accuracies of a k-NN event (``knn_top1``, ``knn_top5_k20``); its protocol fields are constants, not curves.
_KNN_ACCURACY = re.compile(r"^knn_(top[15](?:_k\d+)?)$")

_RESERVED = frozenset({
    "step", "samples_seen", "epoch", "time_s", "losses", "diagnostics", "img_per_s", "data_wait_fraction",
    "step_time_s", "max_memory_mb", "max_memory_reserved_mb", "event",
})


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
        self.path = self.run_dir / METRICS_FILE
        self._board = ScalarBoard(self.run_dir, enabled=rank == 0 and tensorboard, start_step=start_step)
        self._bar = None
        self._log = JsonlLog(self.path, resume_step=start_step, enabled=rank == 0, default=_json_default)
        if rank != 0:
            return
        if sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout)

    @property
    def active(self) -> bool:
        return self.rank == 0

    def should_log(self, step: int) -> bool:
        """True every ``log_every_steps`` steps and at the last step."""
        return is_due(step, self.log_every_steps, total_steps=self.total_steps)

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
            schedules: schedule values at this step, stored top-level (``lr``, ``weight_decay``, ``ema_momentum``,
                ``teacher_temp``).
            timing: the :class:`ssl_vil.infra.timing.StepTimer` window since the last logged step.
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
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # What the caching allocator holds: the number that decides out-of-memory, not the allocated peak.
            record["max_memory_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        record.update(scalars)
        self._write(record)
        self._write_tensorboard(record, schedules, scalars)

        if self.should_log(step):
            eta_s = timing.eta_s(self.total_steps - step) if timing is not None and timing.steps else None
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
        """Append a one-off event (data error counts, fallback, skipped step, ...) and print it; a ``knn`` event
        with a ``step`` also writes its accuracies to TensorBoard (``knn/top1``, ``knn/top5_k20``, ...)."""
        if not self.active:
            return None
        if "event" in fields or "time_s" in fields:
            raise ValueError("MetricsLogger.log_event: 'event' and 'time_s' are set by the logger")
        record = {"event": kind, "time_s": round(time.time(), 3), **fields}
        self._write(record)
        if kind == KNN_EVENT and isinstance(fields.get("step"), int):
            self._add_scalars({f"knn/{m.group(1)}": v for k, v in fields.items()
                               if (m := _KNN_ACCURACY.match(k)) and isinstance(v, (int, float))}, fields["step"])
        line = f"event {kind}: " + " ".join(f"{k}={v}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        return record

    def truncate_after(self, step: int) -> int:
        """Cut ``metrics.jsonl`` back to step ``step`` (:meth:`ssl_vil.infra.files.JsonlLog.truncate_after`) and
        hide later TensorBoard events; returns the number of lines dropped."""
        if not self.active:
            return 0
        dropped = self._log.truncate_after(step)
        self._board.purge_after(step)  # TensorBoard keeps its own files
        return dropped

    def _write(self, record: Mapping[str, Any]) -> None:
        self._log.write(record)

    def _add_scalars(self, tags: Mapping[str, float], step: int) -> None:
        self._board.add(tags, step)

    def _write_tensorboard(self, record: Mapping[str, Any], schedules: Mapping[str, float],
                           scalars: Mapping[str, Any]) -> None:
        tags = {
            **{f"loss/{k}": v for k, v in record["losses"].items()},
            **{f"diag/{k}": v for k, v in record["diagnostics"].items()},
            **{f"schedule/{k}": v for k, v in schedules.items()},
            **{f"perf/{k}": record[k] for k in ("img_per_s", "data_wait_fraction", "step_time_s", "max_memory_mb")
               if k in record},
            **{k: v for k, v in scalars.items() if isinstance(v, (int, float))},
        }
        self._add_scalars(tags, record["step"])

    def close(self) -> None:
        self._log.close()
        self._board.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
