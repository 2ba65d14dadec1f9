"""Semantic segmentation on a pretrained backbone (linear or FPN decoder, mIoU, exact resume).

    python eval/segment.py --config recipes/segment_digits.yaml --output-dir OUT [--weights W] [key=value ...]

See ``python eval/segment.py --help``; the implementation lives in :mod:`ssl_vil.segment`.
"""

from ssl_vil.eval.segment import main, run_cli  # noqa: F401  (main: the callable the cluster launcher runs)

if __name__ == "__main__":
    run_cli()
