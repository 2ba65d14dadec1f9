"""Where evaluation results go: an atomically written JSON file and rank-0 log lines."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


def setup_logging(rank: int) -> None:
    """INFO log lines on stderr from rank 0 (warnings only elsewhere), unless logging is already configured."""
    root = logging.getLogger()
    if root.handlers:
        return
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON via a temp file + ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
