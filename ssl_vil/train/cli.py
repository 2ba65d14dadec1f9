"""Pretraining entry point: ``python -m ssl_vil.train --config recipes/X.yaml --output-dir RUN [key=value ...]``.

The same command runs on one process, under ``torchrun`` and under the Slurm launcher (``cluster/submit.py``).
An existing run dir resumes automatically from its newest valid checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ssl_vil.train.preemption import REQUEUE_EXIT_CODE

# A run stopped by a guard (non-finite values past the policy, a collapsed teacher, a blown data error budget).
GUARD_EXIT_CODE = 3

__all__ = ["GUARD_EXIT_CODE", "REQUEUE_EXIT_CODE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ssl_vil.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, type=Path, help="recipe YAML (e.g. recipes/demo_digits.yaml)")
    ap.add_argument("--output-dir", required=True, type=Path, help="run directory (resumed if it exists)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse, validate the config (before any process group), then train. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    from ssl_vil.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from ssl_vil.data.errors import DataErrorBudgetExceeded
    from ssl_vil.infra.dist import init_distributed, shutdown
    from ssl_vil.train.guards import CollapseError, NonFiniteError
    from ssl_vil.train.loop import run
    from ssl_vil.train.run_dir import prepare_run_dir

    try:
        prepare_run_dir(args.output_dir, cfg, is_main=int(os.environ.get("RANK", "0")) == 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    info = init_distributed(device=cfg.train.device, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    try:
        return run(cfg, args.output_dir, info)
    except ConfigError as e:  # e.g. too few shards for ranks × workers, found when the stream opens
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, CollapseError, DataErrorBudgetExceeded) as e:
        print(f"training stopped on rank {info.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return GUARD_EXIT_CODE
    finally:
        shutdown()
