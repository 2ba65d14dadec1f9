"""What a supervised run on a pretrained backbone (classification fine-tuning, segmentation) shares with
pretraining and between its tasks: the step guard, the checkpointer, the step loop and the process set-up.

A task subclasses :class:`SupervisedRun` and provides the model, optimizer and stream, ``train_step`` (one
optimizer step, returning the guard's verdict), ``evaluate`` and the two cadences (``eval_due`` and the
checkpoint interval, plus ``also_checkpoint``); :func:`run_supervised` installs the preemption flag, joins the
process group, builds the run, resumes it from the newest checkpoint and trains it with the step loop pretraining
uses (:func:`ssl_vil.train.step_loop.run_steps`).

Exact resume: a checkpoint is written by the pretraining trainer's :class:`~ssl_vil.train.checkpointing.Checkpointer`
(payload files ``model``, ``optimizer`` and the task's extras, e.g. ``ema``; ``train_state`` with the data cursor,
the guards, the evaluation history and the RNG streams). A run killed after the checkpoint of step ``s`` and resumed
logs the same steps from ``s + 1`` on as one that was never interrupted. Checkpoints written before this layout
(one flat payload) are read through :meth:`SupervisedRun.upgrade`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_vil.checkpoint import CheckpointManager, LoadedCheckpoint, config_hash
from ssl_vil.config import engine
from ssl_vil.config.errors import ConfigError
from ssl_vil.eval.reporting import setup_logging
from ssl_vil.eval.weights_id import weights_sha256
from ssl_vil.infra.dist import DistInfo, barrier, process_group
from ssl_vil.infra.files import JsonlLog, write_json_atomic
from ssl_vil.infra.timing import StepTimer, format_duration, is_due
from ssl_vil.train.checkpointing import CONFIG_METADATA_KEY, Checkpointer, Progress, Stateful
from ssl_vil.train.data import batches_forever
from ssl_vil.train.preemption import PreemptionFlag
from ssl_vil.train.scalar_board import ScalarBoard
from ssl_vil.train.step_guard import StepGuard, Verdict
from ssl_vil.train.step_loop import Periodic, run_steps

logger = logging.getLogger("ssl_vil.eval")

TRAIN_LOG = "train_log.jsonl"

# Keys that may differ when an output dir is resumed: where the data lives, how long the run is (to extend it), the
# cadences, the device and logging. Everything else decides what is computed and must match the checkpoint's config.
RESUME_MUTABLE_KEYS = ("data.train", "data.val", "data.num_workers", "schedule.train_epochs", "schedule.train_steps",
                       "train.device", "train.checkpoint_every_steps", "train.keep_last", "train.eval_every_epochs",
                       "train.eval_every_steps", "train.log_every_steps", "train.tensorboard")


class History(list):
    """The evaluation records of a run (one dict per evaluation), saved with the loop state."""

    def state_dict(self) -> dict[str, Any]:
        return {"records": list(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self[:] = state["records"]


class SupervisedRun:
    """State of one process (rank) of a supervised run; see the module docstring for what a subclass provides.

    ``cfg`` is the task's config: ``cfg.guards`` (:class:`~ssl_vil.train.config.StepGuardConfig`) and
    ``cfg.train.{keep_last, log_every_steps, checkpoint_every_steps, tensorboard}`` are read here. Subclasses set
    ``model``, ``optimizer``, ``stream`` (a resumable stream whose batches carry ``epoch`` and ``batch_in_epoch``)
    and ``total_steps`` before the run starts.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    stream: Any
    total_steps: int
    images_key: str = "images"  # the batch entry whose first dimension counts the images of a step

    def __init__(self, cfg: Any, output_dir: Path, dist: DistInfo, preempt: PreemptionFlag) -> None:
        self.cfg, self.out, self.dist, self.device = cfg, output_dir, dist, dist.device
        t = cfg.train
        # The pretraining trainer's step guard: one collective per step decides skip (non-finite, spike) / stop.
        self.guard = StepGuard.from_config(cfg.guards, output_dir, preempt, rank=dist.rank,
                                           world_size=dist.world_size)
        self.manager = CheckpointManager(output_dir, keep_last=t.keep_last, keep_every_steps=None,
                                         config_hash=config_hash(cfg.to_dict()), world_size=dist.world_size,
                                         git_sha=None, rank=dist.rank,
                                         barrier=barrier if dist.world_size > 1 else None)
        # One record per optimizer step plus events (rank 0); cut back to the checkpoint's step on resume.
        self.log = JsonlLog(output_dir / TRAIN_LOG, enabled=dist.is_main)
        # The same TensorBoard scalars component as pretraining's metrics logger (RUN/tb).
        self.board = ScalarBoard(output_dir, enabled=dist.is_main and t.tensorboard)
        self.progress = Progress()
        self.history = History()

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (inside ``train_step``: the index of the step being taken)."""
        return self.progress.step

    # --------------------------------------------------------------------------------------- task hooks
    def train_step(self, batch: dict[str, Any]) -> Verdict:
        raise NotImplementedError

    def evaluate(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Evaluate after the step that consumed ``batch``; the record (also logged) or None without val data."""
        raise NotImplementedError

    def eval_due(self, batch: dict[str, Any]) -> bool:
        raise NotImplementedError

    def also_checkpoint(self, batch: dict[str, Any]) -> bool:
        """Save points of the task's own besides every ``checkpoint_every_steps`` and the last step."""
        return False

    def describe(self) -> str:
        """One line on what the run will do, logged at the start (after a resume)."""
        raise NotImplementedError

    def extra_components(self) -> dict[str, Stateful]:
        """Task state saved as payload files beside the model and the optimizer (e.g. an EMA model)."""
        return {}

    # ------------------------------------------------------------------------------------------- the step
    def apply_gradients(self, loss: torch.Tensor, batch: dict[str, Any], clip_grad_norm: float | None) -> Verdict:
        """Backward ``loss``, clip, and let the step guard decide: the optimizer steps unless the step is skipped
        (then parameters and optimizer stay untouched). The verdict holds the loss averaged over ranks and the
        pre-clip gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = clip_grad_norm if clip_grad_norm is not None else math.inf
        grad_norm = nn.utils.clip_grad_norm_(params, max_norm).float()
        verdict = self.guard.decide(self.step, terms={"loss": loss.detach().float()}, diagnostics={},
                                    grad_norm=grad_norm, micro_batches=[batch])
        if verdict.skip:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        return verdict

    # ------------------------------------------------------------------------------------------- checkpoint
    def checkpointer(self) -> Checkpointer:
        """The pretraining trainer's checkpointer over this task's components."""
        return Checkpointer(
            self.manager, every_steps=self.cfg.train.checkpoint_every_steps, total_steps=self.total_steps,
            payload={"model": self.model, "optimizer": self.optimizer, **self.extra_components()},
            loop_state={"data": self.stream, "finite_guard": self.guard.finite, "spike_guard": self.guard.spike,
                        "history": self.history},
            config_record=self.cfg.to_dict(), also_due=lambda _, batch: self.also_checkpoint(batch),
            upgrade=self.upgrade)

    def upgrade(self, loaded: LoadedCheckpoint) -> None:
        """Read a checkpoint of the earlier flat layout (``model``, ``optimizer``, ``data``, ``config``,
        ``history``, guards and extras side by side in one payload) as the current one. It holds no RNG streams:
        the tasks reseed every step from counters, so the continuation is exact all the same. Guard states it
        lacks (written before the step guard) start fresh, as they did."""
        p = loaded.payload
        p.pop("config", None)
        p["train_state"] = {
            "step": loaded.step, "samples_seen": loaded.step * self.stream.global_batch_size, "data": p.pop("data"),
            "finite_guard": p.pop("finite_guard", None) or self.guard.finite.state_dict(),
            "spike_guard": p.pop("spike_guard", None) or (self.guard.spike.state_dict() if self.guard.spike else {}),
            "history": {"records": p.pop("history", [])}, "rng": None}

    def check_config(self, loaded: LoadedCheckpoint) -> None:
        """Refuse (one :class:`ConfigError` listing the keys) to continue a checkpoint written with a config that
        differs in keys outside :data:`RESUME_MUTABLE_KEYS` (a different model, lr, augmentation, seed...)."""
        recorded = loaded.manifest["metadata"].get(CONFIG_METADATA_KEY) or loaded.payload.get("config")
        if not isinstance(recorded, dict):
            return
        diffs = engine.diff(recorded, self.cfg.to_dict(), ignore_prefixes=RESUME_MUTABLE_KEYS)
        if diffs:
            raise ConfigError(f"{self.out}: the checkpoint {Path(loaded.path).name} was written with another config; "
                              f"these keys differ: {engine.describe_diff(diffs)}. Keys that may change on resume: "
                              f"{', '.join(RESUME_MUTABLE_KEYS)}. Use a new --output-dir, --no-resume, or revert "
                              f"these overrides to resume.")

    def try_resume(self, ckpt: Checkpointer) -> bool:
        """Load the newest valid checkpoint of the output dir, if there is one."""
        loaded = ckpt.restore(self.progress, self.dist.rank, check=self.check_config)
        if loaded is None:
            return False
        self.log.truncate_after(self.step)
        self.board.purge_after(self.step)
        logger.info("resumed from %s: step %d, epoch %d, batch %d of %d", loaded.path, self.step,
                    self.stream.epoch, self.stream.batches_consumed, self.stream.batches_per_epoch)
        return True

    # --------------------------------------------------------------------------------------------- results
    def write_results(self, protocol: str, file: str, resumed: bool, t0: float, *, best: str,
                      **task: Any) -> dict[str, Any]:
        """The results record of the run, written to ``OUT/file`` by rank 0: what was trained (weights, their
        hash, the model), how (steps, samples, global batch, peak lr, world size, device, resumed), every
        evaluation, the best ``best`` value among them, the config and the time since ``t0``; ``task`` adds the
        task's own fields. Needs ``self.info`` (the model info) and ``self.lr`` (the peak lr)."""
        evals = [h for h in self.history if h.get("event") == "eval"]
        weights = self.cfg.model.weights
        source = self.info.get("source") or weights
        results: dict[str, Any] = {
            "protocol": protocol, "weights": weights, "weights_sha256": weights_sha256(source) if source else None,
            "model": self.info["model"], "model_kwargs": self.info.get("kwargs", {}), **task,
            "steps": self.step, "samples_seen": self.progress.samples_seen,
            "global_batch_size": self.stream.global_batch_size, "peak_lr": self.lr,
            "world_size": self.dist.world_size, "device": str(self.dist.device), "resumed": resumed,
            "final": evals[-1] if evals else None,
            f"best_{best}": max((h[best] for h in evals if h[best] is not None), default=None),
            "evals": evals, "config": self.cfg.to_dict(), "elapsed_s": time.perf_counter() - t0}
        if self.dist.is_main:
            write_json_atomic(self.out / file, results)
        return results

    # ------------------------------------------------------------------------------------------------ loop
    def run(self, ckpt: Checkpointer) -> int:
        """Train to the last step; 0 when done, or the exit code of a save for a signal (requeue / Ctrl-C)."""

        def step(batch: dict[str, Any]) -> tuple[Verdict, int]:
            return self.train_step(batch), batch[self.images_key].shape[0] * self.dist.world_size

        def evaluate(_: int, batch: dict[str, Any]) -> None:
            record = self.evaluate(batch)
            if record is not None:
                self.log.write(record)
                self.board.add({f"eval/{k}": v for k, v in record.items()
                                if k not in ("step", "epoch") and not k.startswith("n_")}, self.step)
                self.history.append(record)
            self.model.train()

        self.model.train()
        return run_steps(batches_forever(self.stream), progress=self.progress, total_steps=self.total_steps,
                         step=step, log_step=self._log_step, checkpointer=ckpt, preempt=self.guard.preempt,
                         periodic=[Periodic(lambda _, batch: self.eval_due(batch), evaluate)],
                         on_stop=lambda event, code: self.log.write({"event": event, "step": self.step,
                                                                     "exit_code": code}))

    def _log_step(self, batch: dict[str, Any], verdict: Verdict, timer: StepTimer) -> None:
        loss = verdict.metrics["loss"]
        lr = peak_group_lr(self.optimizer)
        self.log.write({"step": self.step, "epoch": batch["epoch"], "loss": loss, "lr": lr,
                        "grad_norm": verdict.metrics["grad_norm"], "skipped": float(verdict.skip)})
        if verdict.skip:
            self.log.write({"event": "step_skipped", "step": self.step,
                            "nonfinite": float(verdict.skip_nonfinite), "spike": float(verdict.skip_spike)})
            logger.warning("step %d skipped (%s)", self.step,
                           "non-finite loss or gradients" if verdict.skip_nonfinite else "loss spike")
        self.board.add({"loss/loss": loss, "schedule/lr": lr, "diag/grad_norm": verdict.metrics["grad_norm"]},
                       self.step)
        if is_due(self.step, self.cfg.train.log_every_steps, total_steps=self.total_steps):
            timing = timer.pop_window()
            self.board.add({"perf/img_per_s": timing.img_per_s, "perf/data_wait_fraction": timing.data_wait_fraction},
                           self.step)
            logger.info("step %d/%d (epoch %d) loss %.4f lr %.3g %.1f img/s data-wait %.0f%% ETA %s", self.step,
                        self.total_steps, batch["epoch"] + 1, loss, lr, timing.img_per_s,
                        100 * timing.data_wait_fraction, format_duration(timing.eta_s(self.total_steps - self.step)))


def peak_group_lr(optimizer: torch.optim.Optimizer) -> float:
    """lr of the un-decayed groups (lr_scale 1: head / decoder) = the scheduler's current value."""
    return max(float(g["lr"]) / float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups)


def run_supervised(device: str, output_dir: Path, resume: bool,
                   build: Callable[[DistInfo, PreemptionFlag], SupervisedRun],
                   finish: Callable[[SupervisedRun, bool, float], dict[str, Any]]) -> dict[str, Any] | int:
    """Set up the process, build the run with ``build(dist, preempt)``, resume it (unless ``resume=False``), train
    it, and return ``finish(run, resumed, start time)`` (the results, computed while the process group is up), or
    the requeue / interrupt exit code when a signal stopped the run after saving at a step boundary.

    The preemption flag is installed first, as in pretraining: a signal during start-up is honoured at the first
    step boundary.
    """
    preempt = PreemptionFlag(interrupt=True, announce=True)
    preempt.install()
    try:
        with process_group(device) as dist:
            preempt.announce = dist.is_main
            setup_logging(dist.rank)
            if dist.is_main:
                output_dir.mkdir(parents=True, exist_ok=True)
            barrier()
            t0 = time.perf_counter()
            run = build(dist, preempt)
            ckpt = run.checkpointer()
            resumed = resume and run.try_resume(ckpt)
            if not resumed and dist.is_main:
                run.log.truncate_after(0)
                run.board.purge_after(0)
            logger.info("%s", run.describe())
            try:
                code = run.run(ckpt)
            finally:
                run.log.close()
                run.board.close()
            if code:
                barrier()
                return code
            results = finish(run, resumed, t0)
            barrier()
            return results
    finally:
        preempt.uninstall()
