"""Where evaluation results go: rank-0 log lines (results files: :func:`ssl_vil.infra.files.write_json_atomic`)."""

from __future__ import annotations

import logging
import sys


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
