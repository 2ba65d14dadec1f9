"""Linear-probe grid evaluation of a pretrained ViL backbone (DINOv2 protocol, held-out and val selection).

    python eval/linear.py --weights RUN_DIR --train-data D --val-data D [--precompute-features] [--output-dir OUT]

See ``python eval/linear.py --help``; the implementation lives in :mod:`ssl_vil.eval.linear`.
"""

from ssl_vil.eval.linear import main

if __name__ == "__main__":
    main()
