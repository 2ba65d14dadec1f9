"""The fine-tuning run: build everything from a :class:`FinetuneConfig`, resume if a checkpoint exists, train,
evaluate, write ``OUT/results_finetune.json``. See :mod:`ssl_vil.eval.finetune_setup` for the parts and
:mod:`ssl_vil.eval.supervised_run` for the guard, checkpoint and loop it shares with segmentation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_vil.eval import finetune_setup as ft
from ssl_vil.eval.finetune_config import FinetuneConfig
from ssl_vil.eval.inputs import default_split
from ssl_vil.eval.supervised_run import SupervisedRun, run_supervised
from ssl_vil.eval.train_inputs import open_train_stream, source_classes
from ssl_vil.infra.dist import DistInfo
from ssl_vil.infra.precision import autocast
from ssl_vil.infra.timing import is_due
from ssl_vil.train.preemption import PreemptionFlag
from ssl_vil.train.step_guard import Verdict

logger = logging.getLogger("ssl_vil.eval")


def _train_transform(cfg: FinetuneConfig, img_size: int, mean: list[float], std: list[float]) -> Any:
    from timm.data import create_transform

    a = cfg.augment
    return create_transform(
        input_size=img_size, is_training=True, scale=tuple(a.scale), hflip=a.hflip, color_jitter=a.color_jitter,
        auto_augment=a.auto_augment, interpolation=a.interpolation, mean=tuple(mean), std=tuple(std),
        re_prob=a.re_prob, re_mode=a.re_mode, re_count=a.re_count,
    )


def _class_count(cfg: FinetuneConfig, classes: tuple[str, ...] | list[str]) -> int:
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    if not classes:
        raise ValueError(f"data.train {cfg.data.train!r} names no classes (no manifest 'classes' / ImageFolder "
                         "sub-directories); set model.num_classes")
    return len(classes)


class _Run(SupervisedRun):
    """State of one fine-tuning process (rank)."""

    images_key = "views"

    def __init__(self, cfg: FinetuneConfig, output_dir: Path, dist: DistInfo, preempt: PreemptionFlag) -> None:
        super().__init__(cfg, output_dir, dist, preempt)
        d = cfg.data
        # Model init draws from the global RNG: same seed on every rank, so DDP starts from one model.
        torch.manual_seed(cfg.train.seed)
        train_split = d.train_split or default_split(d.train, "train")
        self.val_split = d.val_split or (default_split(d.val, "val") if d.val else None)

        # Class count (from the data) -> model and its info (size, normalisation) -> transform -> stream.
        self.classes = source_classes(d.train, train_split)
        self.num_classes = _class_count(cfg, self.classes)
        model, self.info = ft.build_model(cfg, self.num_classes)
        self.model = model.to(self.device)
        self.img_size = d.img_size or int(self.info["img_size"])
        self.mean = d.mean or list(self.info["mean"])
        self.std = d.std or list(self.info["std"])
        self.val_source = ft.open_val_source(cfg, train_classes=self.classes, img_size=self.img_size, mean=self.mean,
                                             std=self.std, split=self.val_split, rank=dist.rank,
                                             world_size=dist.world_size)
        self.stream = open_train_stream(
            d.train, transform=_train_transform(cfg, self.img_size, self.mean, self.std), batch_size=d.batch_size,
            seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size, num_workers=d.num_workers,
            split=train_split,
        )
        self.steps_per_epoch = self.stream.batches_per_epoch
        self.total_steps = ft.total_steps_of(cfg, self.steps_per_epoch)
        self.lr = ft.learning_rate(cfg, self.stream.global_batch_size)
        self.optimizer = ft.build_optimizer(self.model, cfg, self.lr)
        self.scheduler = ft.build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema.decay)
        self.train_model: nn.Module = self.model
        if dist.world_size > 1:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.mixup, self.criterion = self._loss()

    def _loss(self) -> tuple[Any, nn.Module]:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        m = self.cfg.mixup
        if m.active:
            mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                          switch_prob=m.switch_prob, mode="batch", label_smoothing=m.label_smoothing,
                          num_classes=self.num_classes)
            return mixup, SoftTargetCrossEntropy()
        if m.label_smoothing > 0:
            return None, LabelSmoothingCrossEntropy(smoothing=m.label_smoothing)
        return None, nn.CrossEntropyLoss()

    def describe(self) -> str:
        return (f"fine-tuning {self.info['model']}: {self.num_classes} classes, {self.total_steps} steps "
                f"({self.cfg.schedule.train_epochs} epochs x {self.steps_per_epoch}), global batch "
                f"{self.stream.global_batch_size}, peak lr {self.lr:.3g}")

    # ------------------------------------------------------------------------------------------- checkpoint
    def extra_components(self) -> dict[str, Any]:
        return {} if self.ema is None else {"ema": self.ema.module}

    # ------------------------------------------------------------------------------------------------ train
    def train_step(self, batch: dict[str, Any]) -> Verdict:
        """One optimizer step, unless the step guard skips it; the verdict holds the loss averaged over ranks."""
        cfg = self.cfg
        ft.reseed_step(cfg.train.seed, self.step, self.dist.rank)
        self.scheduler.step_update(num_updates=self.step)
        x = batch["views"].to(self.device, non_blocking=True)
        y = batch["labels"].to(self.device, non_blocking=True)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        with autocast(cfg.train.precision, self.device):
            loss = self.criterion(self.train_model(x), y)
        verdict = self.apply_gradients(loss, batch, cfg.optim.clip_grad_norm)
        if self.ema is not None and not verdict.skip:  # a skipped step leaves the EMA untouched too
            self.ema.update(self.model, step=self.step + 1)  # the count of steps taken, this one included
        return verdict

    def _epoch_done(self, batch: dict[str, Any]) -> bool:
        return batch["batch_in_epoch"] + 1 == self.steps_per_epoch

    def eval_due(self, batch: dict[str, Any]) -> bool:
        return self._epoch_done(batch) and is_due(batch["epoch"] + 1, self.cfg.train.eval_every_epochs,
                                                  total_steps=self.cfg.schedule.train_epochs)

    def also_checkpoint(self, batch: dict[str, Any]) -> bool:
        return self._epoch_done(batch)

    def evaluate(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        source = self.val_source
        if source is None:
            return None
        epoch = batch["epoch"]
        res = ft.evaluate(self.model, source.batches(), self.device, self.cfg.train.precision)
        record: dict[str, Any] = {"event": "eval", "step": self.step, "epoch": epoch + 1, "top1": res.top1,
                                  "top5": res.top5, "loss": res.loss, "n_val": res.total}
        if self.ema is not None:
            ema_res = ft.evaluate(self.ema.module, source.batches(), self.device, self.cfg.train.precision)
            record.update(ema_top1=ema_res.top1, ema_top5=ema_res.top5, ema_loss=ema_res.loss)
        logger.info("eval after epoch %d (step %d): top1 %.2f top5 %.2f%s", epoch + 1, self.step, res.top1,
                    res.top5, f" | EMA top1 {record['ema_top1']:.2f}" if self.ema is not None else "")
        return record


def run_finetune(cfg: FinetuneConfig, output_dir: str | Path, *, resume: bool = True) -> dict[str, Any] | int:
    """Fine-tune per ``cfg`` into ``output_dir`` (resuming from its newest checkpoint unless ``resume=False``).

    Returns the results dict (also written to ``OUT/results_finetune.json`` by rank 0), or, when a preemption
    signal (SIGUSR2 / SIGTERM) or Ctrl-C stopped the run after saving at a step boundary,
    :data:`REQUEUE_EXIT_CODE` / :data:`INTERRUPT_EXIT_CODE`.
    """
    out = Path(output_dir)
    return run_supervised(cfg.train.device, out, resume, lambda dist, preempt: _Run(cfg, out, dist, preempt),
                          lambda run, resumed, t0: _results(cfg, run, resumed, t0))


def _results(cfg: FinetuneConfig, run: _Run, resumed: bool, t0: float) -> dict[str, Any]:
    results = run.write_results("finetune", ft.RESULTS_FILE, resumed, t0, best="top1", num_classes=run.num_classes,
                                classes=list(run.classes), img_size=run.img_size,
                                train_epochs=cfg.schedule.train_epochs, steps_per_epoch=run.steps_per_epoch)
    final = results["final"]
    if run.dist.is_main:
        print(f"fine-tune {run.info['model']}: {run.step} steps" + (
            f", val top1 {final['top1']:.2f} top5 {final['top5']:.2f}" if final else ", no val data") + (
            f", EMA top1 {final['ema_top1']:.2f}" if final and "ema_top1" in final else ""), flush=True)
    return results
