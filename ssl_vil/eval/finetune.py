"""Fine-tuning CLI; the code behind ``eval/finetune.py``.

    python eval/finetune.py --config recipes/finetune_digits.yaml --output-dir OUT [--weights W] [key.sub=value ...]
    torchrun --nproc_per_node=N eval/finetune.py --config ... --output-dir OUT

Resume, signals, the step guard and the exit codes: :mod:`ssl_vil.eval.supervised_cli`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ssl_vil.config.errors import invalid
from ssl_vil.eval import supervised_cli as cli
from ssl_vil.eval.finetune_config import load_finetune_config
from ssl_vil.infra.cli_errors import user_errors
from ssl_vil.infra.exit_codes import GUARD_EXIT_CODE, INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE

__all__ = ["GUARD_EXIT_CODE", "INTERRUPT_EXIT_CODE", "REQUEUE_EXIT_CODE", "build_parser", "main"]

PROG = "eval/finetune.py"


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(PROG, "Fine-tune a pretrained ViL backbone", recipes="recipes/finetune_*.yaml",
                            outputs="checkpoints, train_log.jsonl, results_finetune.json",
                            weights_help="shortcut for model.weights=W", override_example="optim.base_lr=1e-3")


@user_errors(PROG)
def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    """Fine-tune; returns the results dict, or an exit code when the run stopped early (see the module docstring).
    A user error (bad recipe key or value, unreadable weights, unusable data...) exits with status 2 and one line
    on stderr (:mod:`ssl_vil.infra.cli_errors`)."""
    args = build_parser().parse_args(argv)
    cfg = load_finetune_config(args.config, cli.overrides_of(args))
    for key in ("train", "val"):
        value = getattr(cfg.data, key)
        if value is not None and str(value).startswith("pipe:"):
            raise invalid(f"data.{key}", value, "a shard dir / glob / http(s) URL or an ImageFolder directory; "
                          "pipe: URLs (shell commands) are not supported by fine-tuning: fetch the shards first")
    from ssl_vil.eval.finetune_loop import run_finetune

    return cli.train(PROG, "fine-tuning", lambda: run_finetune(cfg, args.output_dir, resume=not args.no_resume),
                     argv)


def run_cli() -> None:
    """``python eval/finetune.py`` / ``python -m ssl_vil.eval.finetune``: the exit status is main's code (0 when
    fine-tuning completed)."""
    cli.exit_with(main())


if __name__ == "__main__":
    run_cli()
