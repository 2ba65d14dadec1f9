"""Fine-tuning CLI; the code behind ``eval/finetune.py``.

    python eval/finetune.py --config recipes/finetune_digits.yaml --output-dir OUT [--weights W] [key.sub=value ...]
    torchrun --nproc_per_node=N eval/finetune.py --config ... --output-dir OUT

Re-running the same command resumes from ``OUT``'s newest valid checkpoint (``--no-resume`` starts over).
"""

from __future__ import annotations

import argparse
from typing import Any

from ssl_vil.config.errors import invalid
from ssl_vil.eval.finetune_config import load_finetune_config
from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors

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
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune; a user error (bad recipe key or value, unreadable weights, unusable data...) exits with status 2
    and one line on stderr (:mod:`ssl_vil.infra.cli_errors`)."""
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"model.weights={args.weights}"] if args.weights else [])
    cfg = load_finetune_config(args.config, overrides)
    for key in ("train", "val"):
        value = getattr(cfg.data, key)
        if value is not None and str(value).startswith("pipe:"):
            raise invalid(f"data.{key}", value, "a shard dir / glob / http(s) URL or an ImageFolder directory; "
                          "pipe: URLs (shell commands) are not supported by fine-tuning: fetch the shards first")
    from ssl_vil.eval.finetune_loop import run_finetune

    return run_finetune(cfg, args.output_dir, resume=not args.no_resume)


if __name__ == "__main__":
    main()
