"""The training loop: resume, iterate, guard, checkpoint, preempt, export.

``run(cfg, run_dir)`` is what ``python -m ssl_vil.train`` calls on every rank, locally, under torchrun and under
the Slurm launcher. It returns 0 when the run is complete, :data:`REQUEUE_EXIT_CODE` after a preemption save.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ssl_vil.checkpoint import CheckpointManager, capture_rng_state, config_hash, restore_rng_state
from ssl_vil.config import RunConfig, to_dict
from ssl_vil.data.error_tally import COUNTER_KEYS, reduce_error_counts
from ssl_vil.data.errors import DataErrorBudgetExceeded
from ssl_vil.dist import DistInfo, all_reduce_, barrier, is_distributed
from ssl_vil.export import export_run
from ssl_vil.faults import maybe_kill
from ssl_vil.train.build import build_optimizer, build_ssl_objective, schedule_config
from ssl_vil.train.data import batches_forever, build_stream, error_counts
from ssl_vil.train.key_log import KeyLog
from ssl_vil.train.knn_monitor import KnnMonitor
from ssl_vil.train.guards import CollapseDetector, FiniteGuard, SpikeGuard
from ssl_vil.train.metrics_log import MetricsLogger, StepTimer
from ssl_vil.train.preemption import REQUEUE_EXIT_CODE, PreemptionFlag, maybe_inject_signal
from ssl_vil.train.run_dir import git_sha
from ssl_vil.train.step import DIAGNOSTICS, LOSS_TERMS, StepComponents, train_step
from ssl_vil.train.watchdog import HangWatchdog, maybe_inject_sleep

log = logging.getLogger("ssl_vil.train")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(cfg: RunConfig, device: torch.device):
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    if p == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def run(cfg: RunConfig, run_dir: Path, dist: DistInfo) -> int:
    """Train to ``derived.total_steps`` (resuming from the run dir); 0 when done, REQUEUE_EXIT_CODE if preempted."""
    # Installed first: a signal during start-up is honoured at the first step boundary (save, exit to requeue).
    preempt = PreemptionFlag()
    preempt.install()
    try:
        return _run(cfg, run_dir, dist, preempt)
    finally:
        preempt.uninstall()


def _run(cfg: RunConfig, run_dir: Path, dist: DistInfo, preempt: PreemptionFlag) -> int:
    d = cfg.derived
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # The same init on every rank: the teacher is a copy made before DDP would broadcast the student.
    _seed_everything(cfg.train.seed)
    objective = build_ssl_objective(cfg).to(dist.device)
    _seed_everything(cfg.train.seed + 1000 * dist.rank + 1)  # per-rank streams (drop path) from here on
    student = objective.student
    if is_distributed():
        student = objective.wrap_student(lambda m: DistributedDataParallel(
            m, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, broadcast_buffers=False))
    if cfg.train.compile:
        student = objective.wrap_student(lambda m: torch.compile(m))
    optimizer = build_optimizer(cfg, objective.student)
    g = cfg.guards
    finite = FiniteGuard(g.nonfinite_policy, g.max_consecutive_skips, run_dir, dist.rank)
    spike = SpikeGuard(g.spike_window_steps, g.spike_z_threshold, min(20, g.spike_window_steps)) if g.spike_detection else None
    collapse = CollapseDetector(g.collapse_ratio, g.collapse_window_steps)
    stream = build_stream(cfg, dist)
    ckpt = CheckpointManager(run_dir, keep_last=cfg.checkpoint.keep_last,
                             keep_every_steps=cfg.checkpoint.keep_every_steps, config_hash=config_hash(to_dict(cfg)),
                             world_size=dist.world_size, git_sha=git_sha(), rank=dist.rank,
                             barrier=barrier if is_distributed() else None)

    def stateful() -> dict[str, Any]:
        """Everything a bitwise-exact continuation needs, besides the objective and the optimizer."""
        return {"step": step, "samples_seen": samples_seen, "data": stream.state_dict(),
                "finite_guard": finite.state_dict(), "spike_guard": spike.state_dict() if spike else {},
                "collapse": collapse.state_dict()}

    step, samples_seen = 0, 0
    loaded = ckpt.load_latest()
    if loaded is not None:
        objective.load_state_dict(loaded.payload["objective"])
        optimizer.load_state_dict(loaded.payload["optimizer"])
        st = loaded.payload["train_state"]
        step, samples_seen = int(st["step"]), int(st["samples_seen"])
        stream.load_state_dict(st["data"])
        finite.load_state_dict(st["finite_guard"])
        if spike:
            spike.load_state_dict(st["spike_guard"])
        collapse.load_state_dict(st["collapse"])
        rng = st["rng"]
        # Per-rank RNG streams (drop path) continue exactly on the same world size; on another one, ranks
        # reuse the saved streams cyclically.
        restore_rng_state(rng[dist.rank % len(rng)] if isinstance(rng, list) else rng)
    logger = MetricsLogger(run_dir, dist.rank, log_every_steps=cfg.logging.log_every_steps, total_steps=d.total_steps,
                           tensorboard=cfg.logging.tensorboard, start_step=step)
    keys_log = KeyLog(run_dir, dist.rank, start_step=step, enabled=cfg.logging.keys_log)
    if loaded is not None:
        logger.log_event("resumed", step=step, checkpoint=str(loaded.path), fallbacks=ckpt.fallbacks)
    elif ckpt.fallbacks:
        logger.log_event("checkpoint_fallback", fallbacks=ckpt.fallbacks)

    comp = StepComponents(objective=objective, student=student, optimizer=optimizer, schedule=schedule_config(cfg),
                          finite=finite, spike=spike, collapse=collapse, clip_grad_norm=cfg.optim.clip_grad_norm,
                          autocast=_autocast(cfg, dist.device), rank=dist.rank)
    objective.train()
    watchdog = HangWatchdog(g.watchdog_timeout_s, run_dir, dist.rank)
    timer = StepTimer()
    knn = KnnMonitor(cfg, dist)
    data_errors = dict.fromkeys(COUNTER_KEYS, 0)  # this rank's bad-data counts since the start of this process

    def save(at_step: int) -> None:
        # Every rank gathers its RNG state: resuming on the same world size restores each rank's stream exactly.
        payload = {"objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                   "train_state": stateful() | {"rng": _gather_rng()}}
        with watchdog.paused():
            ckpt.save(at_step, payload, metadata={"samples_seen": samples_seen})

    it = batches_forever(stream)
    accum = cfg.optim.grad_accum_steps
    watchdog.start()
    timer.start()
    try:
        while step < d.total_steps:
            watchdog.beat(step)
            maybe_inject_sleep(step, dist.rank)
            micro = _next_micro_batches(it, accum, dist)
            timer.data_ready()
            metrics = train_step(comp, micro, step)
            step += 1
            samples_seen += cfg.optim.global_batch_size
            keys_log.write(step, [k for b in micro for k in b["keys"]])
            maybe_kill("mid_step", step=step, rank=dist.rank)
            timer.step_done(cfg.optim.global_batch_size)
            for b in micro:
                for k, v in error_counts(b).items():
                    data_errors[k] += v
            log_now = logger.should_log(step)  # same verdict on every rank: the reduction below is collective
            data_totals = {f"data_{k}": float(v) for k, v in reduce_error_counts(data_errors).items() if v} if log_now else {}
            logger.log_step(step, samples_seen=samples_seen, epoch=stream.epoch,
                            losses={k: metrics[k] for k in LOSS_TERMS},
                            diagnostics={k: metrics[k] for k in DIAGNOSTICS + ("grad_norm",)},
                            schedules={k: metrics[k] for k in ("lr", "weight_decay", "ema_momentum", "teacher_temp")},
                            timing=timer.pop_window() if log_now else None,
                            skipped=metrics["skipped"], **data_totals)
            if metrics["skipped"]:
                logger.log_event("step_skipped", step=step, nonfinite=metrics["skip_nonfinite"],
                                 spike=metrics["skip_spike"])
            if knn.due(step):
                with watchdog.paused():
                    logger.log_event("knn", step=step, **knn(objective.teacher.backbone))
                timer.start()
            maybe_inject_signal(step, dist.rank)
            stop = preempt.should_stop()  # all ranks agree (MAX all-reduce)
            if stop or step % cfg.checkpoint.every_steps == 0 or step == d.total_steps:
                save(step)
                maybe_kill("after_checkpoint", step=step, rank=dist.rank)
                timer.start()
            if stop:
                logger.log_event("preempted", step=step, exit_code=REQUEUE_EXIT_CODE)
                return REQUEUE_EXIT_CODE
    finally:
        watchdog.stop()
        logger.close()
        keys_log.close()
    if dist.is_main:
        export_run(run_dir, step)
    barrier()
    return 0


def _next_micro_batches(it: Iterator[dict[str, Any]], n: int, dist: DistInfo) -> list[dict[str, Any]]:
    """The step's micro-batches; a blown data error budget on any rank stops every rank here, before the step's
    collectives (a rank that raised alone would leave the others waiting in DDP's all-reduce)."""
    error: DataErrorBudgetExceeded | None = None
    try:
        micro = [_to_device(next(it), dist.device) for _ in range(n)]
    except DataErrorBudgetExceeded as e:
        error, micro = e, []
    if is_distributed():
        failed = all_reduce_(torch.tensor([error is not None], dtype=torch.int32, device=dist.device), "max")
        if failed.item() and error is None:
            error = DataErrorBudgetExceeded("another rank exceeded the data error budget; its log names the shards")
    if error is not None:
        raise error
    return micro


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _gather_rng() -> list[dict[str, Any]] | dict[str, Any]:
    state = capture_rng_state()
    if not is_distributed():
        return state
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, state)
    return out
