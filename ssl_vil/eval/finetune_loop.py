"""The fine-tuning run: build everything from a :class:`FinetuneConfig`, resume if a checkpoint exists, train,
evaluate, write ``OUT/results_finetune.json``. See :mod:`ssl_vil.eval.finetune_setup` for the parts."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_vil.checkpoint import CheckpointManager, config_hash
from ssl_vil.eval import finetune_setup as ft
from ssl_vil.eval.finetune_config import FinetuneConfig
from ssl_vil.eval.inputs import default_split
from ssl_vil.eval.reporting import setup_logging
from ssl_vil.eval.train_inputs import open_train_stream, source_classes
from ssl_vil.eval.weights_id import weights_sha256
from ssl_vil.infra.dist import DistInfo, all_reduce_scalar, barrier, is_distributed, process_group
from ssl_vil.infra.exit_codes import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE
from ssl_vil.infra.files import JsonlLog, write_json_atomic
from ssl_vil.infra.precision import autocast
from ssl_vil.infra.timing import StepTimer, format_duration, is_due
from ssl_vil.train.guards import FiniteGuard, SpikeGuard
from ssl_vil.train.preemption import PreemptionFlag
from ssl_vil.train.step_guard import StepGuard, Verdict

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


class _Run:
    """State of one fine-tuning process (rank)."""

    def __init__(self, cfg: FinetuneConfig, output_dir: Path, dist: DistInfo, preempt: PreemptionFlag) -> None:
        self.cfg, self.out, self.dist = cfg, output_dir, dist
        self.device = dist.device
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
        # The pretraining trainer's step guard: one collective per step decides skip (non-finite, spike) / stop.
        g = cfg.guards
        self.finite = FiniteGuard(g.nonfinite_policy, g.max_consecutive_skips, output_dir, dist.rank)
        self.spike = SpikeGuard(g.spike_window_steps, g.spike_z_threshold, min(20, g.spike_window_steps)) \
            if g.spike_detection else None
        self.guard = StepGuard(self.finite, self.spike, preempt, rank=dist.rank, world_size=dist.world_size)
        self.ckpt = CheckpointManager(output_dir, keep_last=cfg.train.keep_last, keep_every_steps=None,
                                      config_hash=config_hash(cfg.to_dict()), world_size=dist.world_size,
                                      git_sha=None, rank=dist.rank, barrier=barrier if dist.world_size > 1 else None)
        # One record per optimizer step plus eval events (rank 0); cut back to the checkpoint's step on resume.
        self.log = JsonlLog(output_dir / ft.TRAIN_LOG, enabled=dist.is_main)
        self.step = 0
        self.history: list[dict[str, Any]] = []

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

    # ------------------------------------------------------------------------------------------- checkpoint
    def payload(self) -> dict[str, Any]:
        p: dict[str, Any] = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                             "data": self.stream.state_dict(), "config": self.cfg.to_dict(),
                             "history": list(self.history)}
        if self.ema is not None:
            p["ema"] = self.ema.module.state_dict()
        p["finite_guard"] = self.finite.state_dict()
        if self.spike is not None:
            p["spike_guard"] = self.spike.state_dict()
        return p

    def save(self) -> None:
        self.ckpt.save(self.step, self.payload(), metadata={"epoch": self.stream.epoch,
                                                             "batches_consumed": self.stream.batches_consumed})

    def try_resume(self) -> bool:
        loaded = self.ckpt.load_latest(map_location=self.device)
        if loaded is None:
            return False
        p = loaded.payload
        self.model.load_state_dict(p["model"])
        self.optimizer.load_state_dict(p["optimizer"])
        if self.ema is not None:
            if "ema" not in p:
                raise RuntimeError(f"{loaded.path}: checkpoint has no EMA state but ema.enabled=true")
            self.ema.module.load_state_dict(p["ema"])
        self.stream.load_state_dict(p["data"])
        self.history = list(p.get("history", []))
        if "finite_guard" in p:  # checkpoints written before fine-tuning had the step guard lack them
            self.finite.load_state_dict(p["finite_guard"])
        if self.spike is not None and "spike_guard" in p:
            self.spike.load_state_dict(p["spike_guard"])
        self.step = loaded.step
        self.log.truncate_after(self.step)
        logger.info("resumed from %s: step %d, epoch %d, batch %d of %d", loaded.path, self.step,
                    self.stream.epoch, self.stream.batches_consumed, self.steps_per_epoch)
        return True

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
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm is not None else math.inf
        grad_norm = nn.utils.clip_grad_norm_(params, max_norm).float()
        verdict = self.guard.decide(self.step, terms={"loss": loss.detach().float()}, diagnostics={},
                                    grad_norm=grad_norm, micro_batches=[batch])
        if verdict.skip:  # parameters, optimizer and EMA untouched
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        self.step += 1
        if self.ema is not None and not verdict.skip:
            self.ema.update(self.model, step=self.step)
        return verdict

    def evaluate(self, epoch: int) -> dict[str, Any] | None:
        source = self.val_source
        if source is None:
            return None
        res = ft.evaluate(self.model, source.batches(), self.device, self.cfg.train.precision)
        record: dict[str, Any] = {"event": "eval", "step": self.step, "epoch": epoch + 1, "top1": res.top1,
                                  "top5": res.top5, "loss": res.loss, "n_val": res.total}
        if self.ema is not None:
            ema_res = ft.evaluate(self.ema.module, source.batches(), self.device, self.cfg.train.precision)
            record.update(ema_top1=ema_res.top1, ema_top5=ema_res.top5, ema_loss=ema_res.loss)
        logger.info("eval after epoch %d (step %d): top1 %.2f top5 %.2f%s", epoch + 1, self.step, res.top1,
                    res.top5, f" | EMA top1 {record['ema_top1']:.2f}" if self.ema is not None else "")
        self.log.write(record)
        self.history.append(record)
        return record

    def run(self) -> int:
        """Train to the last step; 0 when done, or the exit code of a save for a signal (requeue / Ctrl-C)."""
        cfg = self.cfg
        timer = StepTimer()
        self.model.train()
        timer.start()
        while self.step < self.total_steps:
            for batch in self.stream:
                timer.data_ready()
                verdict = self.train_step(batch)
                loss = verdict.metrics["loss"]
                timer.step_done(batch["views"].shape[0] * self.dist.world_size)
                lr = ft.peak_group_lr(self.optimizer)
                self.log.write({"step": self.step, "epoch": batch["epoch"], "loss": loss, "lr": lr,
                                "grad_norm": verdict.metrics["grad_norm"], "skipped": float(verdict.skip)})
                if verdict.skip:
                    self.log.write({"event": "step_skipped", "step": self.step,
                                    "nonfinite": float(verdict.skip_nonfinite), "spike": float(verdict.skip_spike)})
                    logger.warning("step %d skipped (%s)", self.step,
                                   "non-finite loss or gradients" if verdict.skip_nonfinite else "loss spike")
                if is_due(self.step, cfg.train.log_every_steps, total_steps=self.total_steps):
                    timing = timer.pop_window()
                    logger.info("step %d/%d (epoch %d) loss %.4f lr %.3g %.1f img/s ETA %s", self.step,
                                self.total_steps, batch["epoch"] + 1, loss, lr, timing.img_per_s,
                                format_duration(timing.eta_s(self.total_steps - self.step)))
                epoch_done = batch["batch_in_epoch"] + 1 == self.steps_per_epoch
                # Evaluate before the epoch-end checkpoint, so a resumed run never skips or repeats an eval.
                if epoch_done and is_due(batch["epoch"] + 1, cfg.train.eval_every_epochs,
                                         total_steps=cfg.schedule.train_epochs):
                    self.evaluate(batch["epoch"])
                    timer.start()
                if epoch_done or verdict.stop or is_due(self.step, cfg.train.checkpoint_every_steps):
                    self.save()
                    timer.start()
                if verdict.stop:
                    code = stop_exit_code(self.guard.preempt)
                    self.log.write({"event": "interrupted" if code == INTERRUPT_EXIT_CODE else "preempted",
                                    "step": self.step, "exit_code": code})
                    return code
                if self.step >= self.total_steps:
                    break
        return 0



def stop_exit_code(preempt: PreemptionFlag) -> int:
    """Ctrl-C on any rank: the user's stop (never requeued); otherwise a preemption. Collective, once."""
    interrupted = int(preempt.interrupted)
    if is_distributed():
        interrupted = all_reduce_scalar(interrupted, "max")
    return INTERRUPT_EXIT_CODE if interrupted else REQUEUE_EXIT_CODE


def run_finetune(cfg: FinetuneConfig, output_dir: str | Path, *, resume: bool = True) -> dict[str, Any] | int:
    """Fine-tune per ``cfg`` into ``output_dir`` (resuming from its newest checkpoint unless ``resume=False``).

    Returns the results dict (also written to ``OUT/results_finetune.json`` by rank 0), or, when a preemption
    signal (SIGUSR2 / SIGTERM) or Ctrl-C stopped the run after saving at a step boundary,
    :data:`REQUEUE_EXIT_CODE` / :data:`INTERRUPT_EXIT_CODE`.
    """
    # Installed first, as in pretraining: a signal during start-up is honoured at the first step boundary.
    preempt = PreemptionFlag(interrupt=True, announce=True)
    preempt.install()
    try:
        with process_group(cfg.train.device) as dist:
            preempt.announce = dist.is_main
            return _finetune(cfg, Path(output_dir), resume, dist, preempt)
    finally:
        preempt.uninstall()


def _finetune(cfg: FinetuneConfig, output_dir: Path, resume: bool, dist: DistInfo, preempt: PreemptionFlag
              ) -> dict[str, Any] | int:
    setup_logging(dist.rank)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    t0 = time.perf_counter()
    run = _Run(cfg, output_dir, dist, preempt)
    resumed = resume and run.try_resume()
    if not resumed and dist.is_main:
        run.log.truncate_after(0)
    logger.info("fine-tuning %s: %d classes, %d steps (%d epochs x %d), global batch %d, peak lr %.3g",
                run.info["model"], run.num_classes, run.total_steps, cfg.schedule.train_epochs,
                run.steps_per_epoch, run.stream.global_batch_size, run.lr)
    try:
        code = run.run()
    finally:
        run.log.close()
    if code:
        barrier()
        return code
    evals = [h for h in run.history if h.get("event") == "eval"]
    final = evals[-1] if evals else None
    source = run.info.get("source") or cfg.model.weights
    results: dict[str, Any] = {
        "protocol": "finetune",
        "weights": cfg.model.weights,
        "weights_sha256": weights_sha256(source) if source else None,
        "model": run.info["model"], "model_kwargs": run.info.get("kwargs", {}),
        "num_classes": run.num_classes, "classes": list(run.classes), "img_size": run.img_size,
        "steps": run.step, "train_epochs": cfg.schedule.train_epochs, "steps_per_epoch": run.steps_per_epoch,
        "global_batch_size": run.stream.global_batch_size,
        "samples_seen": run.step * run.stream.global_batch_size,
        "peak_lr": run.lr, "world_size": dist.world_size, "device": str(dist.device), "resumed": resumed,
        "final": final, "best_top1": max((h["top1"] for h in evals), default=None),
        "evals": evals, "config": cfg.to_dict(), "elapsed_s": time.perf_counter() - t0,
    }
    if dist.is_main:
        write_json_atomic(output_dir / ft.RESULTS_FILE, results)
        summary = (f"fine-tune {run.info['model']}: {run.step} steps" + (
            f", val top1 {final['top1']:.2f} top5 {final['top5']:.2f}" if final else ", no val data") + (
            f", EMA top1 {final['ema_top1']:.2f}" if final and "ema_top1" in final else ""))
        print(summary, flush=True)
    barrier()
    return results
