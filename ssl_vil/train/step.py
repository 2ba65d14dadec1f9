"""One optimizer step of self-distillation, written the way the method reads.

schedules at step -> objective(micro-batches) -> backward -> unscale + clip -> step guard (one all-reduce)
-> optimizer step -> EMA -> centers

Everything stateful besides the model lives in injected components (:class:`StepComponents`), each with its own
tests: the step guard decides, the objective owns student/teacher/centers, the schedules are pure functions of
``step``, the grad scaler (fp16 only; a pass-through otherwise) owns the loss scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ssl_vil.objectives import SelfDistillationObjective
from ssl_vil.config import RunConfig
from ssl_vil.infra.dist import is_dtensor
from ssl_vil.schedules import apply_schedules
from ssl_vil.train.guards import CollapseDetector
from ssl_vil.train.step_guard import StepGuard, Verdict

LOSS_TERMS = ("loss", "dino", "ibot", "koleo")
DIAGNOSTICS = ("teacher_entropy", "teacher_entropy_ratio", "student_teacher_kl", "center_norm", "mask_ratio")


@dataclass
class StepComponents:
    objective: SelfDistillationObjective
    student: nn.Module  # what the forward goes through: objective.student, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    schedule: RunConfig  # the schedules are pure functions of (step, resolved run config)
    guard: StepGuard
    collapse: CollapseDetector
    clip_grad_norm: float | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler


def clip_per_submodule(student: nn.Module, max_norm: float | None) -> Tensor:
    """Clip the backbone and the heads each to ``max_norm``; returns the total pre-clip norm (scalar fp32).

    Under FSDP2 the gradients are DTensor shards: ``clip_grad_norm_`` then reduces the per-shard norms over the
    ranks, so each submodule is clipped by its global norm (as under DDP, where every rank holds the full
    all-reduced gradients), and the norm returned is that global one, as a plain tensor.
    """
    norms = []
    for name, sub in _network(student).named_children():
        params = [p for p in sub.parameters() if p.grad is not None]
        if not params:
            continue
        if is_dtensor(params[0].grad):
            norm = (torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True) if max_norm is None
                    else torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
            norms.append(norm.full_tensor())  # the global norm as a plain tensor (torch replicates it already)
        elif max_norm is None:
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    return torch.linalg.vector_norm(torch.stack(norms).float())


def _network(student: nn.Module) -> nn.Module:
    """The network under its DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, whose children
    are the backbone and the heads. (A compiled student's only child is ``_orig_mod``: without unwrapping it,
    a compiled run would clip backbone and heads together.)"""
    while True:
        if isinstance(student, DistributedDataParallel):
            student = student.module
        elif "_orig_mod" in student._modules:
            student = student._modules["_orig_mod"]
        else:
            return student


def _no_sync(student: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    # DDP all-reduces gradients only on the last micro-batch of an accumulated step.
    return contextlib.nullcontext() if last or not hasattr(student, "no_sync") else student.no_sync()


def train_step(c: StepComponents, micro_batches: list[dict[str, Any]], step: int) -> Verdict:
    """Run one optimizer step over ``micro_batches``; the verdict carries the global metrics and the decisions."""
    sched = apply_schedules(c.optimizer, step, c.schedule)  # lr, wd, momentum, teacher temp: pure in step
    # Forward passes move buffers (BatchNorm running stats); a skipped step must leave them as they were.
    buffers = [(b, b.clone()) for b in c.objective.buffers()]
    n = len(micro_batches)
    totals: dict[str, Tensor] = {}
    for i, batch in enumerate(micro_batches):
        with _no_sync(c.student, last=i == n - 1), c.autocast():
            out = c.objective(batch, teacher_temp=sched["teacher_temp"])
            c.scaler.scale(out["loss"] / n).backward()
        for k in LOSS_TERMS + DIAGNOSTICS:
            totals[k] = totals.get(k, 0.0) + out[k].detach().float() / n
    c.scaler.unscale_(c.optimizer)  # clip and check the true gradients
    grad_norm = clip_per_submodule(c.student, c.clip_grad_norm)

    verdict = c.guard.decide(step, terms={k: totals[k] for k in LOSS_TERMS},
                             diagnostics={k: totals[k] for k in DIAGNOSTICS}, grad_norm=grad_norm,
                             micro_batches=micro_batches, scaler_enabled=c.scaler.is_enabled())
    verdict.metrics.update(sched)
    if verdict.skip:
        c.optimizer.zero_grad(set_to_none=True)
        for b, saved in buffers:
            b.copy_(saved)
        c.objective.discard_step()  # centers untouched; parameters and optimizer were never touched
        c.scaler.update()  # an overflow lowers the scale
        return verdict

    c.scaler.step(c.optimizer)
    c.scaler.update()
    c.optimizer.zero_grad(set_to_none=True)
    c.objective.update_teacher(sched["ema_momentum"])
    c.objective.commit_step()  # centers move once per optimizer step, from all micro-batches and ranks
    c.collapse.update(verdict.metrics["teacher_entropy_ratio"], step=step)
    return verdict
