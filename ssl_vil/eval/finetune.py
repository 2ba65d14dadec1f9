"""Fine-tuning CLI; the code behind ``eval/finetune.py``.

    python eval/finetune.py --config recipes/finetune_digits.yaml --output-dir OUT [--weights W] [key.sub=value ...]
    torchrun --nproc_per_node=N eval/finetune.py --config ... --output-dir OUT

Re-running the same command resumes from ``OUT``'s newest valid checkpoint (``--no-resume`` starts over).
"""

from __future__ import annotations

import argparse
from typing import Any

from ssl_vil.eval.finetune_config import load_finetune_config
from ssl_vil.eval.finetune_loop import run_finetune


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/finetune.py", description="Fine-tune a pretrained ViL backbone")
    p.add_argument("--config", required=True, help="fine-tuning recipe (recipes/finetune_*.yaml)")
    p.add_argument("--output-dir", required=True, help="checkpoints, train_log.jsonl, results_finetune.json")
    p.add_argument("--weights", default=None, help="shortcut for model.weights=W")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --output-dir")
    p.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value (e.g. optim.base_lr=1e-3)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"model.weights={args.weights}"] if args.weights else [])
    cfg = load_finetune_config(args.config, overrides)
    return run_finetune(cfg, args.output_dir, resume=not args.no_resume)


if __name__ == "__main__":
    main()
