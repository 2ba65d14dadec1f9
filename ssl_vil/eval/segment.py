"""Semantic segmentation CLI; the code behind ``eval/segment.py``.

    python eval/segment.py --config recipes/segment_digits.yaml --output-dir OUT [--weights W] [key.sub=value ...]
    torchrun --nproc_per_node=N eval/segment.py --config ... --output-dir OUT

Fine-tunes a pretrained backbone (or a random init: no ``--weights``) with a light decoder on image + mask pairs
and reports mIoU / pixel accuracy per class (``OUT/results_segment.json``). Resume, signals, the step guard and the
exit codes: :mod:`ssl_vil.eval.supervised_cli`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ssl_vil.eval import supervised_cli as cli
from ssl_vil.infra.cli_errors import user_errors
from ssl_vil.infra.exit_codes import GUARD_EXIT_CODE, INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE
from ssl_vil.segment.config import load_segment_config

__all__ = ["GUARD_EXIT_CODE", "INTERRUPT_EXIT_CODE", "REQUEUE_EXIT_CODE", "build_parser", "load_segment_config",
           "main"]

PROG = "eval/segment.py"


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(PROG, "Fine-tune a pretrained backbone for semantic segmentation",
                            recipes="recipes/segment_*.yaml",
                            outputs="checkpoints, train_log.jsonl, results_segment.json",
                            weights_help="shortcut for model.weights=W (none: random init)",
                            override_example="schedule.train_steps=500")


@user_errors(PROG)
def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    """Train and evaluate; returns the results dict, or an exit code when the run stopped early. A user error
    (bad recipe key or value, unreadable weights, unusable data...) exits with status 2 and one line on stderr."""
    args = build_parser().parse_args(argv)
    cfg = load_segment_config(args.config, cli.overrides_of(args))
    from ssl_vil.segment.loop import run_segment

    return cli.train(PROG, "segmentation", lambda: run_segment(cfg, args.output_dir, resume=not args.no_resume),
                     argv)


def run_cli() -> None:
    """``python eval/segment.py`` / ``python -m ssl_vil.eval.segment``: exit status 0 when training completed."""
    cli.exit_with(main())


if __name__ == "__main__":
    run_cli()
