"""Periodic k-NN of the teacher backbone during pretraining (``knn_monitor.every_steps`` > 0).

Every rank extracts the pooled "[CLS]" features of its share of ``knn_monitor.train`` / ``knn_monitor.val`` with the
teacher backbone and the evaluation code's exact k-NN (DINO weighted vote) scores the val split; the call is
collective. It runs under ``fork_rng`` and in eval mode, so a run with the monitor trains bitwise like one without.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_vil.config import RunConfig
from ssl_vil.eval import features as feats
from ssl_vil.eval.inputs import eval_transform, open_eval_source
from ssl_vil.eval.knn_search import knn_classify
from ssl_vil.infra.dist import DistInfo
from ssl_vil.infra.timing import is_due


class KnnMonitor:
    def __init__(self, cfg: RunConfig, dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        a = cfg.data.augment
        # Full image at the pretraining size: the monitor tracks progress, the protocol numbers come from eval/knn.py.
        self.transform = eval_transform(a.global_size, a.mean, a.std, crop_pct=1.0)

    def due(self, step: int) -> bool:
        """Every ``knn_monitor.every_steps`` steps and at the last step; never when that is 0."""
        return is_due(step, self.cfg.knn_monitor.every_steps, total_steps=self.cfg.derived.total_steps)

    @torch.no_grad()
    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """``{"knn_top1": top-1 at the first k, "knn_top1_k{k}": ..., "knn_top5_k{k}": ...}`` in percent."""
        ev, pooling = self.cfg.knn_monitor, self.cfg.objective.pooling
        was_training = backbone.training
        backbone.eval()
        sets = {}
        with torch.random.fork_rng(devices=[]):
            for split, source in (("train", ev.train), ("val", ev.val)):
                src = open_eval_source(source, transform=self.transform, batch_size=ev.batch_size,
                                       rank=self.dist.rank, world_size=self.dist.world_size)
                sets[split] = feats.extract(
                    src.batches(), lambda x: feats.pooled_features(backbone.forward_features(x), "cls", pooling),
                    device=self.dist.device, normalize=True)
        backbone.train(was_training)
        train, val = sets["train"], sets["val"]
        counts = knn_classify(val.features.to(self.dist.device), val.labels.to(self.dist.device),
                              train.features.to(self.dist.device), train.labels.to(self.dist.device),
                              list(ev.k), temperature=ev.temperature)
        out = {"knn_top1": counts[0].top1}
        for c in counts:
            out[f"knn_top1_k{c.k}"] = c.top1
            out[f"knn_top5_k{c.k}"] = c.top5
        return out
