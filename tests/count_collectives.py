"""Run the trainer with ``torch.distributed.all_reduce`` wrapped: counts the calls by the ssl_vil file that made them.

    python tests/count_collectives.py OUT.json --config ... --output-dir ... [overrides]

Writes ``{"calls": {"ssl_vil/train/step_guard.py": n, ...}}`` for this rank to ``OUT.json.rank{RANK}``.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    calls: Counter[str] = Counter()
    original = torch.distributed.all_reduce

    def counting_all_reduce(*args, **kwargs):
        frame = sys._getframe(1)
        # The first caller inside the library that is not the collectives helper itself.
        while frame is not None and (not frame.f_code.co_filename.startswith(str(ROOT / "ssl_vil"))
                                     or "/infra/" in frame.f_code.co_filename
                                     or frame.f_code.co_filename.endswith("ssl_vil/dist.py")):
            frame = frame.f_back
        calls[str(Path(frame.f_code.co_filename).relative_to(ROOT)) if frame else "<outside ssl_vil>"] += 1
        return original(*args, **kwargs)

    torch.distributed.all_reduce = counting_all_reduce
    from ssl_vil.train.cli import main as train_main

    code = train_main(argv)
    Path(f"{out}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps({"calls": dict(calls)}))
    return code


if __name__ == "__main__":
    sys.exit(main())
