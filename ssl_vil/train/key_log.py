"""Per-rank record of the sample keys each optimizer step consumed (``logging.keys_log=true``).

``RUN/keys/rank{r}.jsonl`` holds one ``{"step": s, "keys": [...]}`` line per step, so the data order of a run
(and of a resumed one) can be audited: an exact resume continues the same key sequence. On resume, lines past
the resumed step are dropped, like the metrics file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class KeyLog:
    def __init__(self, run_dir: Path, rank: int, *, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "keys" / f"rank{rank}.jsonl"
        self._file = None
        if not enabled:
            return
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
        self._file = open(self.path, "a", buffering=1)

    def write(self, step: int, keys: list[str]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_key_log(path: Path) -> dict[int, list[str]]:
    """``{step: keys}`` of a key log."""
    out = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["keys"]
    return out
