"""Fine-tuning CLI; the code behind ``eval/finetune.py``.

    python eval/finetune.py --config recipes/finetune_digits.yaml --output-dir OUT [--weights W] [key.sub=value ...]
    torchrun --nproc_per_node=N eval/finetune.py --config ... --output-dir OUT

Re-running the same command resumes from ``OUT``'s newest valid checkpoint (``--no-resume`` starts over).
SIGUSR2 / SIGTERM (preemption) and Ctrl-C save at the next step boundary and exit with :data:`REQUEUE_EXIT_CODE`
(75, which the cluster launcher requeues) / :data:`INTERRUPT_EXIT_CODE` (130); non-finite losses or gradients past
``guards.max_consecutive_skips`` (or any, with ``guards.nonfinite_policy=halt``) stop with :data:`GUARD_EXIT_CODE`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from ssl_vil.config.errors import invalid
from ssl_vil.eval.finetune_config import load_finetune_config
from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors
from ssl_vil.infra.exit_codes import GUARD_EXIT_CODE, INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE

__all__ = ["GUARD_EXIT_CODE", "INTERRUPT_EXIT_CODE", "REQUEUE_EXIT_CODE", "build_parser", "main"]

PROG = "eval/finetune.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Fine-tune a pretrained ViL backbone",
                                formatter_class=HelpFormatter)
    add_version(p)
    p.add_argument("--config", required=True, help="fine-tuning recipe (recipes/finetune_*.yaml)")
    p.add_argument("--output-dir", required=True, help="checkpoints, train_log.jsonl, results_finetune.json")
    p.add_argument("--weights", default=None, help="shortcut for model.weights=W")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --output-dir")
    p.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value (e.g. optim.base_lr=1e-3)")
    return p


@user_errors(PROG)
def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    """Fine-tune; returns the results dict, or an exit code when the run stopped early (see the module docstring).
    A user error (bad recipe key or value, unreadable weights, unusable data...) exits with status 2 and one line
    on stderr (:mod:`ssl_vil.infra.cli_errors`)."""
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"model.weights={args.weights}"] if args.weights else [])
    cfg = load_finetune_config(args.config, overrides)
    for key in ("train", "val"):
        value = getattr(cfg.data, key)
        if value is not None and str(value).startswith("pipe:"):
            raise invalid(f"data.{key}", value, "a shard dir / glob / http(s) URL or an ImageFolder directory; "
                          "pipe: URLs (shell commands) are not supported by fine-tuning: fetch the shards first")
    from ssl_vil.eval.finetune_loop import run_finetune
    from ssl_vil.train.guards import NonFiniteError

    try:
        result = run_finetune(cfg, args.output_dir, resume=not args.no_resume)
    except NonFiniteError as e:
        print(f"{PROG}: fine-tuning stopped: {e}", file=sys.stderr, flush=True)
        return GUARD_EXIT_CODE
    report_stop(PROG, result, argv)
    return result


def report_stop(prog: str, result: dict[str, Any] | int, argv: list[str] | None) -> None:
    """When a signal stopped the run (``result`` is an exit code), say so and print the command that resumes."""
    if isinstance(result, int):
        why = "interrupted" if result == INTERRUPT_EXIT_CODE else "preempted"
        command = shlex.join(["python", prog, *(sys.argv[1:] if argv is None else argv)])
        print(f"{why}: checkpoint saved; resume with: {command}", file=sys.stderr, flush=True)


def run_cli() -> None:
    """``python eval/finetune.py`` / ``python -m ssl_vil.eval.finetune``: the exit status is main's code (0 when
    fine-tuning completed)."""
    result = main()
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    run_cli()
