"""One optimizer step of self-distillation, written the way the method reads.

schedules at step -> objective(micro-batches) -> backward -> clip -> finite check -> spike check
-> optimizer step -> EMA -> centers -> metrics

Everything stateful besides the model lives in injected components (:class:`StepComponents`), each with its own
tests: the guards decide, the objective owns student/teacher/centers, the schedules are pure functions of ``step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ssl_vil.dist import all_reduce_
from ssl_vil.faults import fault_matches, maybe_kill
from ssl_vil.objectives import SelfDistillationObjective
from ssl_vil.schedules import ScheduleConfig, apply_schedules
from ssl_vil.train.guards import CollapseDetector, FiniteGuard, SpikeGuard

LOSS_TERMS = ("loss", "dino", "ibot", "koleo")
DIAGNOSTICS = ("teacher_entropy", "teacher_entropy_ratio", "student_teacher_kl", "center_norm", "mask_ratio")


@dataclass
class StepComponents:
    objective: SelfDistillationObjective
    student: nn.Module  # what the forward goes through: objective.student, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    schedule: ScheduleConfig
    finite: FiniteGuard
    spike: SpikeGuard | None
    collapse: CollapseDetector
    clip_grad_norm: float | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    rank: int = 0


def _inject_loss_fault(out: dict[str, Tensor], step: int, rank: int) -> None:
    """Test hook (``SSL_VIL_FAULT=loss:step=7,rank=1,term=ibot,value=nan`` or ``...,scale=50``)."""
    f = fault_matches("loss", step=step, rank=rank)
    if f is None:
        return
    if "scale" in f:  # a loss spike: scales the gradients too
        out["loss"] = out["loss"] * float(f["scale"])
        return
    bad = out["loss"].new_tensor(float(f.get("value", "nan")))
    term = f.get("term", "loss")
    out[term] = out[term] + bad
    if term != "loss":
        out["loss"] = out["loss"] + bad


def _inject_grad_fault(student: nn.Module, step: int, rank: int) -> None:
    """Test hook (``SSL_VIL_FAULT=grad:step=11``): a NaN gradient, as from a bad backward."""
    if fault_matches("grad", step=step, rank=rank) is not None:
        p = next(p for p in student.parameters() if p.grad is not None)
        p.grad.view(-1)[0] = float("nan")


def clip_per_submodule(student: nn.Module, max_norm: float | None) -> Tensor:
    """Clip the backbone and the heads each to ``max_norm``; returns the total pre-clip norm (scalar fp32)."""
    base = student.module if hasattr(student, "module") else student
    norms = []
    for name, sub in base.named_children():
        params = [p for p in sub.parameters() if p.grad is not None]
        if not params:
            continue
        if max_norm is None:
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    return torch.linalg.vector_norm(torch.stack(norms).float())


def _no_sync(student: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    # DDP all-reduces gradients only on the last micro-batch of an accumulated step.
    return contextlib.nullcontext() if last or not hasattr(student, "no_sync") else student.no_sync()


def train_step(c: StepComponents, micro_batches: list[dict[str, Any]], step: int) -> dict[str, float]:
    """Run one optimizer step over ``micro_batches``; returns globally reduced metrics (``skipped`` > 0 if skipped)."""
    sched = apply_schedules(c.optimizer, step, c.schedule)  # lr, wd, momentum, teacher temp: pure in step
    # Forward passes move buffers (BatchNorm running stats); a skipped step must leave them as they were.
    buffers = [(b, b.clone()) for b in c.objective.buffers()]
    n = len(micro_batches)
    totals: dict[str, Tensor] = {}
    for i, batch in enumerate(micro_batches):
        with _no_sync(c.student, last=i == n - 1), c.autocast():
            out = c.objective(batch, teacher_temp=sched["teacher_temp"])
            _inject_loss_fault(out, step, c.rank)
            (out["loss"] / n).backward()
        if i < n - 1:
            maybe_kill("accumulation", step=step, rank=c.rank)
        for k in LOSS_TERMS + DIAGNOSTICS:
            totals[k] = totals.get(k, 0.0) + out[k].detach().float() / n
    _inject_grad_fault(c.student, step, c.rank)
    grad_norm = clip_per_submodule(c.student, c.clip_grad_norm)

    keys = [k for b in micro_batches for k in b["keys"]]
    terms = {k: totals[k] for k in LOSS_TERMS}
    # One collective for every logged scalar: the spike guard and the logs see the same global values.
    reduced = all_reduce_(torch.stack([totals[k] for k in LOSS_TERMS + DIAGNOSTICS] + [grad_norm]), "mean")
    metrics = dict(zip(LOSS_TERMS + DIAGNOSTICS + ("grad_norm",), reduced.tolist()))
    metrics.update(sched)

    ok = c.finite.check(terms, grad_norm, step=step, batch_keys=keys)  # global verdict (MIN all-reduce)
    spike = ok and c.spike is not None and c.spike.check(metrics["loss"], metrics["grad_norm"], step=step)
    if not ok or spike:
        c.optimizer.zero_grad(set_to_none=True)
        for b, saved in buffers:
            b.copy_(saved)
        c.objective.discard_step()  # centers untouched; parameters and optimizer were never touched
        return metrics | {"skipped": 1.0, "skip_nonfinite": float(not ok), "skip_spike": float(bool(spike))}

    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    c.objective.update_teacher(sched["ema_momentum"])
    c.objective.commit_step()  # centers move once per optimizer step, from all micro-batches and ranks
    c.collapse.update(metrics["teacher_entropy_ratio"], step=step)
    return metrics | {"skipped": 0.0}

