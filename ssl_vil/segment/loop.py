"""The segmentation run: build everything from a :class:`SegmentConfig`, resume if a checkpoint exists, train,
evaluate (mIoU), write ``OUT/results_segment.json``.

Exact resume as in classification fine-tuning: a checkpoint (atomic, hashed) holds the model, optimizer, step
guards and data cursor at an optimizer step; augmentations are seeded per sample and the global RNGs (dropout,
drop path) reseeded from ``(seed, step, rank)`` before each step, so a run killed after the checkpoint of step
``s`` and resumed gives the same losses from step ``s + 1`` on (bitwise on CPU in fp32).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vil.data.errors import DataConfigError
from ssl_vil.eval import finetune_setup as ft
from ssl_vil.eval.supervised_run import SupervisedRun, run_supervised
from ssl_vil.infra.dist import DistInfo
from ssl_vil.infra.precision import autocast
from ssl_vil.infra.timing import is_due
from ssl_vil.segment import inference
from ssl_vil.segment.config import SegmentConfig
from ssl_vil.segment.metrics import ConfusionMatrix
from ssl_vil.segment.model import build_segmenter
from ssl_vil.segment.stream import SegTrainStream, eval_batches
from ssl_vil.segment.transforms import SegEvalTransform, SegTrainTransform
from ssl_vil.train.preemption import PreemptionFlag
from ssl_vil.train.step_guard import Verdict

logger = logging.getLogger("ssl_vil.eval")

RESULTS_FILE = "results_segment.json"


def open_pairs(location: str, split: str | None) -> Any:
    from ssl_vil.data.seg_pairs import open_seg_pairs

    return open_seg_pairs(location, split)


def class_names(cfg: SegmentConfig, train: Any, val: Any | None) -> list[str]:
    """The class list: the train data's (manifest / classes.txt), checked against the val data's and
    ``model.num_classes``; numbered names when the data names none."""
    names = list(train.classes)
    other = list(val.classes) if val is not None else []
    if names and other and other != names:
        first = next((i for i, (a, b) in enumerate(zip(names, other)) if a != b), min(len(names), len(other)))
        raise DataConfigError(
            f"class names differ between data.train ({train.source}: {len(names)} classes) and data.val "
            f"({val.source}: {len(other)} classes): first difference at #{first}: "
            f"{names[first] if first < len(names) else None!r} vs {other[first] if first < len(other) else None!r}")
    wanted = cfg.model.num_classes
    if wanted is None:
        if not names:
            raise DataConfigError(f"{train.source} names no classes (no manifest classes / classes.txt); set "
                                  "model.num_classes")
        return names
    if names and wanted != len(names):
        raise DataConfigError(f"model.num_classes={wanted} but {train.source} names {len(names)} classes")
    return names or [str(i) for i in range(wanted)]


class _Run(SupervisedRun):
    """State of one segmentation process (rank)."""

    def __init__(self, cfg: SegmentConfig, output_dir: Path, dist: DistInfo, preempt: PreemptionFlag) -> None:
        super().__init__(cfg, output_dir, dist, preempt)
        d = cfg.data
        self.train_pairs = open_pairs(d.train, d.train_split)
        self.val_pairs = open_pairs(d.val, d.val_split) if d.val else None
        self.classes = class_names(cfg, self.train_pairs, self.val_pairs)
        torch.manual_seed(cfg.train.seed)  # same init on every rank
        model, self.info = build_segmenter(cfg, len(self.classes))
        self.model = model.to(self.device)
        self.mean = d.mean or list(self.info["mean"])
        self.std = d.std or list(self.info["std"])
        self.stream = SegTrainStream(
            self.train_pairs, batch_size=d.batch_size, seed=cfg.train.seed, rank=dist.rank,
            world_size=dist.world_size, num_workers=d.num_workers, num_classes=len(self.classes),
            ignore_index=d.ignore_index,
            transform=SegTrainTransform(d.crop_size, d.scale_range, d.base_size, d.hflip, self.mean, self.std,
                                        d.ignore_index))
        self.total_steps = cfg.schedule.train_steps
        self.lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * self.stream.global_batch_size / 256
        self.optimizer = ft.build_optimizer(self.model, cfg, self.lr)
        self.scheduler = _scheduler(self.optimizer, cfg)
        self.train_model: nn.Module = self.model
        if dist.world_size > 1:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def describe(self) -> str:
        cfg = self.cfg
        return (f"segmentation {self.info['model']} + {cfg.model.decoder} decoder: {len(self.classes)} classes, "
                f"{self.total_steps} steps, global batch {self.stream.global_batch_size}, crop {cfg.data.crop_size}, "
                f"peak lr {self.lr:.3g}")

    def train_step(self, batch: dict[str, Any]) -> Verdict:
        """One optimizer step, unless the step guard skips it; the verdict holds the loss averaged over ranks."""
        cfg = self.cfg
        ft.reseed_step(cfg.train.seed, self.step, self.dist.rank)
        self.scheduler.step_update(num_updates=self.step)
        x = batch["images"].to(self.device, non_blocking=True)
        y = batch["masks"].to(self.device, non_blocking=True)
        with autocast(cfg.train.precision, self.device):
            logits = self.train_model(x)
        # fp32 loss: the softmax over classes at every pixel stays out of bf16
        loss = F.cross_entropy(logits.float(), y, ignore_index=cfg.data.ignore_index)
        return self.apply_gradients(loss, batch, cfg.optim.clip_grad_norm)

    def eval_due(self, batch: dict[str, Any]) -> bool:
        return is_due(self.step, self.cfg.train.eval_every_steps, total_steps=self.total_steps)

    def evaluate(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        if self.val_pairs is None:
            return None
        summary = evaluate(self.model, self.val_pairs, self.cfg, self.classes, self.mean, self.std, self.dist)
        logger.info("eval at step %d: mIoU %.2f pixel acc %.2f", self.step, summary["miou"] or 0.0,
                    summary["pixel_acc"] or 0.0)
        return {"event": "eval", "step": self.step, "miou": summary["miou"], "pixel_acc": summary["pixel_acc"],
                "macc": summary["macc"], "per_class": summary["per_class"], "n_val": len(self.val_pairs)}


def _scheduler(optimizer: torch.optim.Optimizer, cfg: SegmentConfig) -> Any:
    """timm cosine schedule with linear warmup over optimizer steps (``step_update(step)`` before each step);
    timm's schedulers apply each group's ``lr_scale`` (layer decay)."""
    from timm.scheduler import create_scheduler_v2

    s = cfg.schedule
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=s.train_steps,
                                       warmup_epochs=s.warmup_steps, warmup_lr=s.warmup_lr, min_lr=s.min_lr,
                                       step_on_epochs=False, updates_per_epoch=1)
    return scheduler


@torch.no_grad()
def evaluate(model: nn.Module, pairs: Any, cfg: SegmentConfig, classes: list[str], mean: list[float],
             std: list[float], dist: DistInfo) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU / accuracy over ``pairs`` (summed over ranks)."""
    d = cfg.data
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(len(classes), d.ignore_index, dist.device)
    stride = d.eval_stride or max(1, d.crop_size * 2 // 3)
    batches = eval_batches(pairs, transform=SegEvalTransform(d.base_size, mean, std), batch_size=d.batch_size,
                           rank=dist.rank, world_size=dist.world_size, num_workers=d.num_workers,
                           num_classes=len(classes), ignore_index=d.ignore_index)
    with autocast(cfg.train.precision, dist.device):
        for batch in batches:
            images = batch["images"]
            same_size = all(im.shape == images[0].shape for im in images)
            groups = [torch.stack(images)] if same_size else [im.unsqueeze(0) for im in images]
            masks = iter(batch["masks"])
            for x in groups:
                x = x.to(dist.device)
                if d.eval_mode == "slide":
                    logits = inference.predict_slide(model, x, d.crop_size, stride, len(classes))
                else:
                    logits = inference.predict_whole(model, x)
                for one in logits:
                    target = next(masks).to(dist.device)
                    if one.shape[-2:] != target.shape:  # eval resized the image (data.base_size)
                        one = F.interpolate(one[None].float(), size=target.shape, mode="bilinear",
                                            align_corners=False)[0]
                    matrix.update(one.argmax(0), target)
    matrix.all_reduce()
    model.train(was_training)
    return matrix.summary(classes)


def run_segment(cfg: SegmentConfig, output_dir: str | Path, *, resume: bool = True) -> dict[str, Any] | int:
    """Train per ``cfg`` into ``output_dir`` (resuming from its newest checkpoint unless ``resume=False``).

    Returns the results dict (also written to ``OUT/results_segment.json`` by rank 0), or the requeue / interrupt
    exit code when a signal stopped the run after saving at a step boundary.
    """
    out = Path(output_dir)
    return run_supervised(cfg.train.device, out, resume, lambda dist, preempt: _Run(cfg, out, dist, preempt),
                          lambda run, resumed, t0: _results(cfg, run, resumed, t0))


def _results(cfg: SegmentConfig, run: _Run, resumed: bool, t0: float) -> dict[str, Any]:
    results = run.write_results("segment", RESULTS_FILE, resumed, t0, best="miou", decoder=cfg.model.decoder,
                                classes=run.classes, crop_size=cfg.data.crop_size, eval_mode=cfg.data.eval_mode)
    final = results["final"]
    if run.dist.is_main:
        init = f"weights {cfg.model.weights}" if cfg.model.weights else "random init"
        print(f"segment {run.info['model']} ({init}): {run.step} steps" + (
            f", val mIoU {final['miou']:.2f} pixel acc {final['pixel_acc']:.2f}" if final else ", no val data"),
            flush=True)
    return results
