"""The per-step decision of every rank, taken together in ONE all-reduce.

After backward (and gradient unscaling/clipping) each rank contributes, in one float64 SUM all-reduce:

* its loss terms, diagnostics and grad norm (summed, then divided by the world size: the logged global means);
* a one-hot row of finite flags (row r is rank r's, all other rows 0), so the sum is the full rank × quantity
  table: the non-finite verdict is global and says which rank saw what (metaseq #521: a rank-local skip lets
  ranks drift apart);
* whether its data stream exceeded the error budget, and whether it received a preemption signal;
* its cumulative bad-data counters (the logged global totals).

From the reduced vector every rank derives the same verdict, in this order: a blown data budget stops the run;
non-finite values follow :class:`~ssl_vil.train.guards.FiniteGuard`'s policy (an fp16 gradient overflow with finite
losses is the grad scaler's business, not a fault); the loss / grad-norm spike check runs on the global means.
A collective per concern would cost four latencies per step on a multi-node job.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ssl_vil.data.error_tally import COUNTER_KEYS
from ssl_vil.data.errors import DataErrorBudgetExceeded
from ssl_vil.infra.dist import all_reduce_, collective_device
from ssl_vil.train.config import StepGuardConfig
from ssl_vil.train.guards import GRAD_NORM_NAME, FiniteGuard, SpikeGuard
from ssl_vil.train.preemption import PreemptionFlag


@dataclass
class Verdict:
    """What every rank does with the step it has just computed."""

    metrics: dict[str, float]  # global means of the loss terms, diagnostics and grad norm
    data_totals: dict[str, int] = field(default_factory=dict)  # global bad-data counts since this process started
    skip_nonfinite: bool = False
    skip_spike: bool = False
    overflow: bool = False  # fp16: the scaled gradients overflowed; the scaler lowers its scale
    stop: bool = False  # a preemption signal reached some rank: save and exit for requeue

    @property
    def skip(self) -> bool:
        return self.skip_nonfinite or self.skip_spike or self.overflow


class StepGuard:
    """Combines the finite, spike, preemption and data-budget decisions of a step into one collective."""

    @classmethod
    def from_config(cls, cfg: StepGuardConfig, run_dir: Path, preempt: PreemptionFlag, *, rank: int,
                    world_size: int) -> StepGuard:
        """The guard ``cfg`` describes (pretraining's ``guards:`` or a supervised run's); its non-finite guard
        reports into ``run_dir``, and the spike guard, when on, waits for ``min(20, window)`` accepted steps."""
        finite = FiniteGuard(cfg.nonfinite_policy, cfg.max_consecutive_skips, run_dir, rank)
        spike = SpikeGuard(cfg.spike_window_steps, cfg.spike_z_threshold, min(20, cfg.spike_window_steps)) \
            if cfg.spike_detection else None
        return cls(finite, spike, preempt, rank=rank, world_size=world_size)

    def __init__(self, finite: FiniteGuard, spike: SpikeGuard | None, preempt: PreemptionFlag, *,
                 rank: int, world_size: int) -> None:
        self.finite, self.spike, self.preempt = finite, spike, preempt
        self.rank, self.world_size = rank, world_size
        # This rank's bad-data counts since this process started; every key from the start, so ranks pack alike.
        self.data_errors: dict[str, int] = dict.fromkeys(COUNTER_KEYS, 0)

    def decide(self, step: int, *, terms: Mapping[str, Tensor], diagnostics: Mapping[str, Tensor],
               grad_norm: Tensor, micro_batches: list[dict[str, Any]], scaler_enabled: bool = False) -> Verdict:
        """The global verdict on ``step``. Collective: every rank calls it once per step.

        Args:
            terms: 0-d loss terms (``loss`` first); diagnostics: 0-d logged diagnostics.
            grad_norm: 0-d total gradient norm (unscaled).
            micro_batches: this step's batches on this rank: their ``keys`` (written to disk if the non-finite
                policy stops the run), ``data_errors`` counter deltas and ``data_budget_error``, if any.
            scaler_enabled: fp16 loss scaling is on; a non-finite grad norm with finite losses is an overflow.
        """
        batch_keys = [k for b in micro_batches for k in b["keys"]]
        budget_error = next((b["data_budget_error"] for b in micro_batches if b.get("data_budget_error")), None)
        for b in micro_batches:
            for k, v in b.get("data_errors", {}).items():
                self.data_errors[k] = self.data_errors.get(k, 0) + int(v)
        data_errors = self.data_errors
        scalars = [*terms.values(), *diagnostics.values(), grad_norm]
        names = [*terms, GRAD_NORM_NAME]
        # Packed on the step's device and moved once: one host sync per step, after the reduction.
        device = grad_norm.device
        finite = torch.stack([torch.isfinite(t.detach()).all() for t in [*terms.values(), grad_norm]])
        table = torch.zeros(self.world_size, len(names), dtype=torch.float64, device=device)
        table[self.rank] = finite.to(torch.float64)
        counters = sorted(data_errors)
        host = [float(budget_error is not None), float(self.preempt.is_set_locally())]
        host += [float(data_errors[k]) for k in counters]
        packed = torch.cat([
            torch.stack([s.detach().reshape(()) for s in scalars]).to(torch.float64),
            table.flatten(),
            torch.tensor(host, dtype=torch.float64, device=device),
        ])
        packed = all_reduce_(packed.to(collective_device()), "sum").cpu()

        n = len(scalars)
        means = (packed[:n] / self.world_size).tolist()
        flags = packed[n:n + table.numel()].reshape(table.shape).round().to(torch.int32).tolist()
        budget_any, stop_any = packed[n + table.numel():n + table.numel() + 2].tolist()
        totals = packed[n + table.numel() + 2:].round().to(torch.int64).tolist()
        verdict = Verdict(metrics=dict(zip([*terms, *diagnostics, GRAD_NORM_NAME], means)),
                          data_totals=dict(zip(counters, totals)), stop=stop_any > 0)

        if budget_any > 0:
            raise budget_error or DataErrorBudgetExceeded(
                "another rank exceeded the data error budget; its log names the shards")
        bad_quantities = {name for i, name in enumerate(names) if any(row[i] == 0 for row in flags)}
        if scaler_enabled and bad_quantities == {GRAD_NORM_NAME}:
            verdict.overflow = True  # the scaler skips the update and lowers the scale; not a fault of the data
            return verdict
        verdict.skip_nonfinite = not self.finite.decide(flags, names, step=step, batch_keys=batch_keys)
        if not verdict.skip_nonfinite and self.spike is not None:
            verdict.skip_spike = self.spike.check(verdict.metrics["loss"], verdict.metrics[GRAD_NORM_NAME], step=step)
        return verdict
