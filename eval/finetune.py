"""Full fine-tuning of a pretrained ViL backbone (timm optimizer / scheduler / Mixup / EMA, exact resume).

    python eval/finetune.py --config recipes/finetune_digits.yaml --output-dir OUT [--weights W] [key=value ...]

See ``python eval/finetune.py --help``; the implementation lives in :mod:`ssl_vil.eval.finetune_loop`.
"""

from ssl_vil.eval.finetune import main, run_cli  # noqa: F401  (main: the callable the cluster launcher runs)

if __name__ == "__main__":
    run_cli()
