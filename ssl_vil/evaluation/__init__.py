"""Evaluation of pretrained backbones: k-NN, linear-probe grid and full fine-tuning.

Library modules (the CLIs ``eval/knn.py``, ``eval/linear.py`` and ``eval/finetune.py`` are thin wrappers of the
``*_cli`` modules):

* :mod:`~ssl_vil.evaluation.knn` -- exact k-NN search (torch / faiss, distributed) and the weighted vote;
* :mod:`~ssl_vil.evaluation.features` -- "[CLS]" / "[AVG]" / per-block-pair features of a frozen backbone;
* :mod:`~ssl_vil.evaluation.inputs` -- eval transform and exactly-once eval inputs (shards or ImageFolder);
* :mod:`~ssl_vil.evaluation.linear` -- the DINOv2-style linear-head grid, held-out and val selection;
* :mod:`~ssl_vil.evaluation.train_inputs` -- shuffled, resumable training inputs for fine-tuning;
* :mod:`~ssl_vil.evaluation.finetune` / :mod:`~ssl_vil.evaluation.finetune_loop` -- fine-tuning with timm's parts;
* :mod:`~ssl_vil.evaluation.finetune_config` -- the fine-tuning recipe schema.
"""
