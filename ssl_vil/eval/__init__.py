"""Evaluation of pretrained backbones: k-NN, linear-probe grid and full fine-tuning.

Entry points: ``python -m ssl_vil.eval.knn``, ``python -m ssl_vil.eval.linear`` and ``python -m ssl_vil.eval.finetune``
(``eval/knn.py``, ``eval/linear.py``, ``eval/finetune.py`` run the same ``main``). Library modules:

* :mod:`~ssl_vil.eval.knn_search` -- exact k-NN search (torch / faiss, distributed) and the weighted vote;
* :mod:`~ssl_vil.eval.features` -- "[CLS]" / "[AVG]" / per-block-pair features of a frozen backbone;
* :mod:`~ssl_vil.eval.inputs` -- eval transform and exactly-once eval inputs (shards or ImageFolder);
* :mod:`~ssl_vil.eval.linear_probe` -- the DINOv2-style linear-head grid, held-out and val selection;
* :mod:`~ssl_vil.eval.train_inputs` -- shuffled, resumable training inputs for fine-tuning;
* :mod:`~ssl_vil.eval.finetune_setup` / :mod:`~ssl_vil.eval.finetune_loop` -- fine-tuning with timm's parts;
* :mod:`~ssl_vil.eval.finetune_config` -- the fine-tuning recipe schema.
"""
