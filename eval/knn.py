"""k-NN evaluation of a pretrained ViL backbone (DINO / DINOv2 protocol).

    python eval/knn.py --weights RUN_DIR --train-data SHARDS_OR_IMAGEFOLDER --val-data ... [--k 10 20 100 200]
    torchrun --nproc_per_node=N eval/knn.py ...

See ``python eval/knn.py --help``; the implementation lives in :mod:`ssl_vil.eval.knn`.
"""

from ssl_vil.eval.knn import main

if __name__ == "__main__":
    main()
