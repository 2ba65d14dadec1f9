"""Periodic k-NN of the teacher backbone during pretraining (``knn_monitor.every_steps`` > 0).

Every rank extracts the pooled "[CLS]" features of its share of ``knn_monitor.train`` / ``knn_monitor.val`` with the
teacher backbone and the evaluation code's exact k-NN (DINO weighted vote) scores the val split; the call is
collective. The protocol is ``eval/knn.py``'s (same eval transform and ``crop_pct``, same k-NN, val labels matched
to the train classes by name), so the monitor reports what the k-NN CLI reports for the same checkpoint. It runs
under ``fork_rng`` and in eval mode, so a run with the monitor trains bitwise like one without.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_vil.backbones.pooling import token_layout
from ssl_vil.config import RunConfig
from ssl_vil.eval import features as feats
from ssl_vil.eval.inputs import EvalSource, default_split, eval_transform, open_eval_source
from ssl_vil.eval.knn_search import knn_classify
from ssl_vil.infra.dist import DistInfo
from ssl_vil.infra.timing import is_due


class KnnMonitor:
    def __init__(self, cfg: RunConfig, dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        a, ev = cfg.data.augment, cfg.knn_monitor
        # The exported backbone's model.json carries global_size / mean / std: the k-NN CLI's defaults for it.
        self.transform = eval_transform(a.global_size, a.mean, a.std, crop_pct=ev.crop_pct)
        self.sources: dict[str, EvalSource] = {}
        if ev.every_steps:
            # Opened now: a val class the train split lacks stops the run before its first step, not at the
            # first k-NN.
            train = self._open(ev.train, "train")
            self.sources = {"train": train, "val": self._open(ev.val, "val", classes=train.classes,
                                                              classes_source=f"knn_monitor.train ({ev.train})")}

    def _open(self, source: str, role: str, **align: Any) -> EvalSource:
        # One directory holding both splits (make_shards --split train|val) works as with eval/knn.py.
        return open_eval_source(source, transform=self.transform, batch_size=self.cfg.knn_monitor.batch_size,
                                rank=self.dist.rank, world_size=self.dist.world_size,
                                split=default_split(source, role), **align)

    def due(self, step: int) -> bool:
        """Every ``knn_monitor.every_steps`` steps and at the last step; never when that is 0."""
        return is_due(step, self.cfg.knn_monitor.every_steps, total_steps=self.cfg.derived.total_steps)

    @torch.no_grad()
    def __call__(self, backbone: nn.Module) -> dict[str, Any]:
        """``{"knn_top1": top-1 at the first k, "knn_top1_k{k}": ..., "knn_top5_k{k}": ...}`` in percent, plus
        the protocol: ``knn_k``, ``knn_temperature``, ``knn_crop_pct``, ``knn_num_classes``."""
        ev, pooling = self.cfg.knn_monitor, self.cfg.objective.pooling
        was_training = backbone.training
        backbone.eval()
        sets = {}
        with torch.random.fork_rng(devices=[]):
            for split, source in self.sources.items():
                sets[split] = feats.extract(
                    source.batches(), lambda x: feats.pooled_features(backbone.forward_features(x), "cls", pooling,
                                                               token_layout(backbone)),
                    device=self.dist.device, normalize=True)
        backbone.train(was_training)
        train, val = sets["train"], sets["val"]
        classes = self.sources["train"].classes
        counts = knn_classify(val.features.to(self.dist.device), val.labels.to(self.dist.device),
                              train.features.to(self.dist.device), train.labels.to(self.dist.device),
                              list(ev.k), temperature=ev.temperature, num_classes=len(classes) or None)
        out: dict[str, Any] = {"knn_top1": counts[0].top1}
        for c in counts:
            out[f"knn_top1_k{c.k}"] = c.top1
            out[f"knn_top5_k{c.k}"] = c.top5
        out.update(knn_k=list(ev.k), knn_temperature=ev.temperature, knn_crop_pct=ev.crop_pct,
                   knn_num_classes=len(classes) or None)
        return out
