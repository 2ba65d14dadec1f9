"""Per-rank record of the sample keys each optimizer step consumed, for data-order audits.

With ``SSL_VIL_KEYLOG=DIR`` in the environment (the trainer harness sets ``RUN/keys``), the wrapped train step
appends one ``{"step": s, "keys": [...]}`` line per completed step ``s`` to ``DIR/rank{r}.jsonl``. An exact resume
continues the same key sequence: when a process computes its first step (the resumed step ``s0``), lines past
``s0`` are dropped, like the trainer's metrics file.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

KEYLOG_VAR = "SSL_VIL_KEYLOG"


class KeyLog:
    def __init__(self, directory: Path, rank: int, *, start_step: int) -> None:
        self.path = Path(directory) / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    break  # a line cut short by a crash, and nothing after it counts
                if rec["step"] > start_step:
                    break
                kept.append(line)
            tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a SIGKILL loses no finished line

    def write(self, step: int, keys: list[str]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


_open: dict[tuple[str, int], KeyLog] = {}


def record(step_index: int, rank: int, keys: list[str]) -> None:
    """Log the keys of the step computed at ``step_index`` (completed step ``step_index + 1``) if enabled."""
    directory = os.environ.get(KEYLOG_VAR, "")
    if not directory:
        return
    log = _open.get((directory, rank))
    if log is None:
        log = _open[(directory, rank)] = KeyLog(Path(directory), rank, start_step=step_index)
    log.write(step_index + 1, keys)


@atexit.register
def close_all() -> None:
    for log in _open.values():
        log.close()
    _open.clear()


def read_key_log(path: Path) -> dict[int, list[str]]:
    """``{step: keys}`` of a key log."""
    out = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["keys"]
    return out
