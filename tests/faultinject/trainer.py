"""Faults around the training step: stall, preemption signal, SIGKILL, non-finite loss or gradient, loss spike.

The wrappers below replace library functions from the outside (see :mod:`faultinject.hooks`):

* ``ssl_vil.train.loop.train_step(c, micro_batches, step)``: ``sleep`` stalls before step ``step`` runs;
  ``signal:step=N`` is sent before the step that ends at N, so the preemption flag is up when step N's boundary is
  decided; ``kill:at=mid_step,step=N`` fires after the step that ends at N returned (and its keys were logged).
* ``SelfDistillationObjective.forward``: ``loss`` faults edit the returned terms; ``kill:at=accumulation,step=S``
  fires when the second micro-batch of step index S starts (after the first one's backward).
* ``ssl_vil.train.step.clip_per_submodule(student, max_norm)``: ``grad`` plants a NaN gradient before clipping.

Step numbers follow the loop: ``loss`` / ``grad`` / ``accumulation`` / ``sleep`` name the 0-based index of the step
being computed, ``signal`` / ``mid_step`` / ``after_checkpoint`` the number of completed steps.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from faultinject import keylog
from faultinject.spec import ENV_VAR, fault_matches, kill_self, process_rank

# The step index being computed by the wrapped train_step (None outside it), and the objective forwards so far.
_current_step: int | None = None
_forward_calls = 0


def maybe_inject_sleep(step: int, rank: int) -> None:
    """``sleep:rank=R,step=N,secs=S`` (``secs=inf``, the default, sleeps forever): stall this rank."""
    args = fault_matches("sleep", step=step, rank=rank)
    if args is None:
        return
    secs = float(args.get("secs", "inf"))
    if math.isinf(secs):
        while True:
            time.sleep(3600)
    time.sleep(secs)


def maybe_inject_signal(step: int, rank: int) -> bool:
    """``signal:step=N,rank=R[,sig=TERM]``: send the signal (USR2 by default) to this process; True when sent.

    Python runs the handler before the next bytecode, so the handler has run when this returns.
    """
    args = fault_matches("signal", step=step, rank=rank)
    if args is None:
        return False
    name = args.get("sig", "USR2").upper()
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"{ENV_VAR} signal: unknown signal {args['sig']!r} (expected e.g. USR2 or TERM)")
    os.kill(os.getpid(), sig)
    return True


def maybe_kill(where: str, *, step: int, rank: int) -> None:
    """``kill:step=N,rank=R,at=WHERE`` (``at`` defaults to ``mid_step``): SIGKILL this process at WHERE of step N."""
    args = fault_matches("kill", step=step, rank=rank)
    if args is not None and args.get("at", "mid_step") == where:
        kill_self(f"kill at {where} of step {step} on rank {rank}")


def inject_loss_fault(out: dict[str, Any], step: int, rank: int) -> None:
    """``loss:step=S,rank=R,term=ibot,value=nan`` adds the value to a term (and the total); ``loss:...,scale=50``
    multiplies the total loss, gradients included (a spike)."""
    f = fault_matches("loss", step=step, rank=rank)
    if f is None:
        return
    if "scale" in f:
        out["loss"] = out["loss"] * float(f["scale"])
        return
    bad = out["loss"].new_tensor(float(f.get("value", "nan")))
    term = f.get("term", "loss")
    out[term] = out[term] + bad
    if term != "loss":
        out["loss"] = out["loss"] + bad


def wrap_train_step(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def train_step(c: Any, micro_batches: list[dict[str, Any]], step: int, *args: Any, **kwargs: Any) -> Any:
        global _current_step, _forward_calls
        rank = process_rank()
        maybe_inject_sleep(step, rank)
        maybe_inject_signal(step + 1, rank)
        _current_step, _forward_calls = step, 0
        try:
            result = original(c, micro_batches, step, *args, **kwargs)
        finally:
            _current_step = None
        keylog.record(step, rank, [k for b in micro_batches for k in b["keys"]])
        maybe_kill("mid_step", step=step + 1, rank=rank)
        return result

    return train_step


def wrap_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        global _forward_calls
        step = _current_step
        if step is None:
            return original(self, *args, **kwargs)
        rank = process_rank()
        if _forward_calls > 0:
            maybe_kill("accumulation", step=step, rank=rank)
        _forward_calls += 1
        out = original(self, *args, **kwargs)
        inject_loss_fault(out, step, rank)
        return out

    return forward


def wrap_clip(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def clip_per_submodule(student: Any, max_norm: Any, *args: Any, **kwargs: Any) -> Any:
        step = _current_step
        if step is not None and fault_matches("grad", step=step, rank=process_rank()) is not None:
            p = next(p for p in student.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
        return original(student, max_norm, *args, **kwargs)

    return clip_per_submodule
