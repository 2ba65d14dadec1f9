"""The pretraining run: build its components, resume, drive the shared step loop, export.

``run(cfg, run_dir, dist)`` is what ``python -m ssl_vil.train`` calls on every rank, locally, under torchrun and
under the Slurm launcher. It returns 0 when the run is complete, ``REQUEUE_EXIT_CODE`` after a preemption save,
``INTERRUPT_EXIT_CODE`` after a Ctrl-C save (:mod:`ssl_vil.train.preemption`). The loop itself
(:func:`ssl_vil.train.step_loop.run_steps`) is the one fine-tuning and segmentation drive too.
Policies live in the components it drives: the step guard decides skip / stop (one collective per step), the
checkpointer decides when to save and what a save holds, the logger when to print.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_vil.checkpoint import CheckpointError, LoadedCheckpoint, config_hash
from ssl_vil.config import RunConfig, to_dict
from ssl_vil.infra.dist import DistInfo, all_reduce_scalar, barrier, is_distributed
from ssl_vil.export import export_run
from ssl_vil.infra.precision import autocast, resolve_precision
from ssl_vil.infra.timing import StepTimer
from ssl_vil.train.banner import end_summary, start_banner
from ssl_vil.objectives import SelfDistillationObjective
from ssl_vil.train.build import build_backbone, build_optimizer, build_ssl_objective
from ssl_vil.train.checkpointing import Checkpointer, Progress
from ssl_vil.train.data import batches_forever, build_stream
from ssl_vil.train.fsdp import is_sharded, rank_agnostic_payload, shard_objective, unsharded_copy
from ssl_vil.train.guards import CollapseDetector
from ssl_vil.train.knn_monitor import KnnMonitor
from ssl_vil.train.metrics_log import MetricsLogger
from ssl_vil.train.preemption import PreemptionFlag
from ssl_vil.train.run_dir import RunDirError, RunDirLock, check_checkpoint_config, git_sha, write_run_record
from ssl_vil.train.step import DIAGNOSTICS, LOSS_TERMS, StepComponents, train_step
from ssl_vil.train.step_guard import StepGuard, Verdict
from ssl_vil.train.step_loop import Periodic, run_steps
from ssl_vil.train.watchdog import HangWatchdog

log = logging.getLogger("ssl_vil.train")

SCHEDULE_KEYS = ("lr", "weight_decay", "ema_momentum", "teacher_temp")
T = TypeVar("T")


def run(cfg: RunConfig, run_dir: Path, dist: DistInfo) -> int:
    """Train to ``derived.total_steps`` (resuming from the run dir); 0 when done, REQUEUE_EXIT_CODE if preempted.

    Nothing is written to ``run_dir`` until the run is known to start: the data source is opened and the model
    built, rank 0 takes the run dir's lock, every rank loads the checkpoint and checks its recorded config, and
    all ranks agree; only then is ``config.yaml`` written. A refusal raises :class:`RunDirError` (or
    ``ConfigError``) on every rank and leaves ``run_dir`` as it was.
    """
    # Installed first: a signal during start-up is honoured at the first step boundary (save, exit to requeue).
    preempt = PreemptionFlag(interrupt=True, announce=dist.is_main)
    preempt.install()
    lock = RunDirLock(run_dir) if dist.is_main else None
    started = False
    try:
        t = _build(cfg, run_dir, dist, preempt)
        _on_every_rank(lambda: lock.acquire() if lock is not None else None)
        progress = Progress()
        loaded = _on_every_rank(lambda: _restore(cfg, run_dir, dist, t, progress))
        if dist.is_main:
            write_run_record(run_dir, cfg, device=dist.device)
            t.checkpointer.manager.remove_empty_step_dirs()
            log.info("\n%s", start_banner(cfg, run_dir, dist, student=t.step.objective.student, stream=t.stream,
                                           precision=t.precision, resumed_step=progress.step if loaded else None))
        started = True
        return _train(cfg, run_dir, dist, t, progress, loaded)
    finally:
        if lock is not None:
            lock.release(undo_create=not started)
        preempt.uninstall()


def _restore(cfg: RunConfig, run_dir: Path, dist: DistInfo, t: _Trainer, progress: Progress
             ) -> LoadedCheckpoint | None:
    """Load the newest usable checkpoint after checking the config it records against ``cfg``."""
    try:
        return t.checkpointer.restore(progress, dist.rank, check=lambda c: check_checkpoint_config(run_dir, c, cfg))
    except CheckpointError as exc:
        raise RunDirError(f"cannot resume {run_dir}: {exc}. Nothing was modified; repair or move aside the "
                          f"damaged step folders, or use a new --output-dir") from exc


def _on_every_rank(start_step: Callable[[], T]) -> T:
    """Run one start-up step; if it fails on any rank, every rank raises (so no rank starts training alone)."""
    error: BaseException | None = None
    value = None
    try:
        value = start_step()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the ranks agree
        error = exc
    failed = all_reduce_scalar(int(error is not None), "max") if is_distributed() else int(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RunDirError("another rank refused to start (see its message); nothing was written")
    return value


def _train(cfg: RunConfig, run_dir: Path, dist: DistInfo, t: _Trainer, progress: Progress,
           loaded: LoadedCheckpoint | None) -> int:
    """[data -> step -> log -> monitor -> checkpoint -> preempt?]* -> export, from the restored ``progress``."""
    total, batch = cfg.derived.total_steps, cfg.optim.global_batch_size
    logger = MetricsLogger(run_dir, dist.rank, log_every_steps=cfg.logging.log_every_steps, total_steps=total,
                           tensorboard=cfg.logging.tensorboard, start_step=progress.step)
    if loaded is not None:
        logger.log_event("resumed", step=progress.step, checkpoint=str(loaded.path), fallbacks=t.checkpointer.fallbacks)
    elif t.checkpointer.fallbacks:
        logger.log_event("checkpoint_fallback", fallbacks=t.checkpointer.fallbacks)
    watchdog = HangWatchdog(cfg.guards.watchdog_timeout_s, run_dir, dist.rank)
    started_at, first_step = time.monotonic(), progress.step
    last: dict[str, Any] = {"loss": None, "knn": None}

    def step(micro: list[dict[str, Any]]) -> tuple[Verdict, int]:
        verdict = train_step(t.step, micro, progress.step)
        last["loss"] = verdict.metrics["loss"]
        return verdict, batch

    def knn_eval(step: int, _: Any) -> None:
        last["knn"] = t.knn(t.knn_backbone())
        logger.log_event("knn", step=step, **last["knn"])

    t.step.objective.train()
    watchdog.start()
    try:
        code = run_steps(
            _accumulated(batches_forever(t.stream), cfg.optim.grad_accum_steps, dist.device),
            progress=progress, total_steps=total, step=step, checkpointer=t.checkpointer, watchdog=watchdog,
            log_step=lambda _, verdict, timer: _log_step(logger, progress, t.stream.epoch, verdict, timer),
            periodic=[Periodic(lambda step, _: t.knn.due(step), knn_eval)], preempt=t.step.guard.preempt,
            on_stop=lambda event, code: logger.log_event(event, step=progress.step, exit_code=code))
    finally:
        watchdog.stop()
        logger.close()
    if code:
        return code
    if dist.is_main:
        exported = export_run(run_dir, progress.step)
        k = cfg.knn_monitor
        log.info("\n%s", end_summary(run_dir, steps=progress.step - first_step, seconds=time.monotonic() - started_at,
                                     last_loss=last["loss"], knn=last["knn"], export_path=exported,
                                     knn_data=(k.train, k.val) if k.train and k.val else None))
    barrier()
    return 0


@dataclass
class _Trainer:
    step: StepComponents
    stream: Any
    checkpointer: Checkpointer
    precision: str
    knn: KnnMonitor
    knn_backbone: Callable[[], nn.Module]  # the teacher backbone, or an unsharded copy of it (collective) under fsdp2


def _build(cfg: RunConfig, run_dir: Path, dist: DistInfo, preempt: PreemptionFlag) -> _Trainer:
    """Every component of the run, built from the resolved config (nothing restored yet)."""
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # The same init on every rank: the teacher is a copy made before DDP would broadcast the student.
    _seed_everything(cfg.train.seed)
    objective = build_ssl_objective(cfg).to(dist.device)
    _seed_everything(cfg.train.seed + 1000 * dist.rank + 1)  # per-rank streams (drop path) from here on
    student = _distribute(cfg, objective, dist)
    if cfg.train.compile:
        student = objective.wrap_student(torch.compile)  # compiles what the forward goes through (e.g. DDP)
    optimizer = build_optimizer(cfg, objective.student)
    guard = StepGuard.from_config(cfg.guards, run_dir, preempt, rank=dist.rank, world_size=dist.world_size)
    collapse = CollapseDetector(cfg.guards.collapse_ratio, cfg.guards.collapse_window_steps)
    precision = resolve_precision(cfg.train.precision, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")
    stream = build_stream(cfg, dist)
    # Full tensors in the files whatever train.distributed says: checkpoints resume at any world size and mode.
    payload: dict[str, Any] = rank_agnostic_payload(objective, optimizer)
    if scaler.is_enabled():
        payload["grad_scaler"] = scaler
    checkpointer = Checkpointer.for_run(
        run_dir, cfg, config_hash=config_hash(to_dict(cfg)), world_size=dist.world_size, rank=dist.rank,
        git_sha=git_sha(), payload=payload, config_record=to_dict(cfg),
        loop_state={"data": stream, "finite_guard": guard.finite, "spike_guard": guard.spike, "collapse": collapse})
    step = StepComponents(
        objective=objective, student=student, optimizer=optimizer, schedule=cfg,
        guard=guard, collapse=collapse,
        clip_grad_norm=cfg.optim.clip_grad_norm, autocast=functools.partial(autocast, precision, dist.device),
        scaler=scaler)
    # Opened here, before anything is written: a k-NN source that cannot be read refuses the start.
    knn = KnnMonitor(cfg, dist)
    teacher_backbone = objective.teacher.backbone
    knn_backbone = (functools.partial(unsharded_copy, teacher_backbone, functools.partial(build_backbone, cfg))
                    if is_sharded(teacher_backbone) else lambda: teacher_backbone)
    return _Trainer(step=step, stream=stream, checkpointer=checkpointer, precision=precision, knn=knn,
                    knn_backbone=knn_backbone)


def _distribute(cfg: RunConfig, objective: SelfDistillationObjective, dist: DistInfo) -> nn.Module:
    """The one place that decides how the student spans the ranks (``train.distributed``); returns the module the
    training forward goes through. ``ddp``: DistributedDataParallel replicas. ``fsdp2``: student and teacher
    sharded alike per block (:mod:`ssl_vil.train.fsdp`). A single process trains the plain student either way."""
    if not is_distributed():
        return objective.student
    if cfg.train.distributed == "fsdp2":
        return shard_objective(objective, dist.device)
    return objective.wrap_student(lambda m: DistributedDataParallel(
        m, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, broadcast_buffers=False))


def _log_step(logger: MetricsLogger, progress: Progress, epoch: int, v: Verdict, timer: StepTimer) -> None:
    m = v.metrics
    log_now = logger.should_log(progress.step)
    logger.log_step(progress.step, samples_seen=progress.samples_seen, epoch=epoch,
                    losses={k: m[k] for k in LOSS_TERMS}, diagnostics={k: m[k] for k in DIAGNOSTICS + ("grad_norm",)},
                    schedules={k: m[k] for k in SCHEDULE_KEYS}, timing=timer.pop_window() if log_now else None,
                    skipped=float(v.skip), **({f"data_{k}": float(n) for k, n in v.data_totals.items() if n}
                                              if log_now else {}))
    if v.skip:
        reasons = {"nonfinite": float(v.skip_nonfinite), "spike": float(v.skip_spike)}
        logger.log_event("step_skipped", step=progress.step, **reasons, **({"overflow": 1.0} if v.overflow else {}))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _accumulated(batches: Iterator[dict[str, Any]], micro_steps: int, device: torch.device
                 ) -> Iterator[list[dict[str, Any]]]:
    """The micro-batches of one optimizer step (gradient accumulation), on ``device``."""
    while True:
        yield [_to_device(next(batches), device) for _ in range(micro_steps)]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
