"""Progress reporting for long loops: log lines with rate and ETA (Slurm logs are files), tqdm on a TTY only."""

from __future__ import annotations

import logging
import sys
import time

from ssl_vil.infra.timing import format_duration

logger = logging.getLogger("ssl_vil.eval")


class Progress:
    """Counts processed items and logs ``desc: done/total (pct) rate/s ETA 4m12s`` every ``interval_s``.

    ``total`` may be None (unknown stream length): then no percentage/ETA is shown. Only the process with
    ``enabled=True`` (rank 0) reports. A tqdm bar replaces the log lines when stderr is a terminal.
    """

    def __init__(self, desc: str, total: int | None, *, unit: str = "img", interval_s: float = 30.0,
                 enabled: bool = True) -> None:
        self.desc, self.total, self.unit, self.interval_s = desc, total, unit, interval_s
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        self._last_log = self.start
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
            except ImportError:  # tqdm is a dependency, but a log line is always enough
                self._bar = None

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def line(self) -> str:
        elapsed = self.elapsed_s
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100.0 * self.done / self.total:.1f}%), "
                    f"{rate:.1f} {self.unit}/s, elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}")
        return f"{self.desc}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s, elapsed {format_duration(elapsed)}"

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_log >= self.interval_s:
            self._last_log = now
            logger.info(self.line())

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elapsed = self.elapsed_s
        rate = self.done / elapsed if elapsed > 0 else 0.0
        logger.info(f"{self.desc}: done, {self.done} {self.unit} in {format_duration(elapsed)} "
                    f"({rate:.1f} {self.unit}/s)")
