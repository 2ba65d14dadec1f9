"""Semantic segmentation CLI; the code behind ``eval/segment.py``.

    python eval/segment.py --config recipes/segment_digits.yaml --output-dir OUT [--weights W] [key.sub=value ...]
    torchrun --nproc_per_node=N eval/segment.py --config ... --output-dir OUT

Fine-tunes a pretrained backbone (or a random init: no ``--weights``) with a light decoder on image + mask pairs
and reports mIoU / pixel accuracy per class (``OUT/results_segment.json``). Re-running the same command resumes
from ``OUT``'s newest valid checkpoint (``--no-resume`` starts over); signals and guards behave as in
``eval/finetune.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ssl_vil.eval.finetune import report_stop
from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors
from ssl_vil.infra.exit_codes import GUARD_EXIT_CODE, INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE
from ssl_vil.segment.config import load_segment_config

__all__ = ["GUARD_EXIT_CODE", "INTERRUPT_EXIT_CODE", "REQUEUE_EXIT_CODE", "build_parser", "load_segment_config",
           "main"]

PROG = "eval/segment.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Fine-tune a pretrained backbone for semantic segmentation",
                                formatter_class=HelpFormatter)
    add_version(p)
    p.add_argument("--config", required=True, help="segmentation recipe (recipes/segment_*.yaml)")
    p.add_argument("--output-dir", required=True, help="checkpoints, train_log.jsonl, results_segment.json")
    p.add_argument("--weights", default=None, help="shortcut for model.weights=W (none: random init)")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --output-dir")
    p.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value (e.g. schedule.train_steps=500)")
    return p


@user_errors(PROG)
def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    """Train and evaluate; returns the results dict, or an exit code when the run stopped early. A user error
    (bad recipe key or value, unreadable weights, unusable data...) exits with status 2 and one line on stderr."""
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"model.weights={args.weights}"] if args.weights else [])
    cfg = load_segment_config(args.config, overrides)
    from ssl_vil.segment.loop import run_segment
    from ssl_vil.train.guards import NonFiniteError

    try:
        result = run_segment(cfg, args.output_dir, resume=not args.no_resume)
    except NonFiniteError as e:
        print(f"{PROG}: segmentation stopped: {e}", file=sys.stderr, flush=True)
        return GUARD_EXIT_CODE
    report_stop(PROG, result, argv)
    return result


def run_cli() -> None:
    """``python eval/segment.py`` / ``python -m ssl_vil.eval.segment``: exit status 0 when training completed."""
    result = main()
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    run_cli()
