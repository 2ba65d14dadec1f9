"""Teacher centering: an EMA of the mean teacher logit, applied once per optimizer step.

The center is updated from *all* teacher outputs of one optimizer step: every micro-batch adds its row sums
to ``pending_sum`` / ``pending_count`` (:meth:`EMACenter.accumulate`), and :meth:`EMACenter.commit` all-reduces
the pending sums across ranks and applies

    center <- momentum * center + (1 - momentum) * (sum of rows / number of rows)

exactly once. Updating inside every loss call (as lightly does) moves the center once per micro-batch and
per call under gradient accumulation. :meth:`EMACenter.discard` drops the pending sums of a skipped step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_vil.infra.dist import all_reduce_
from ssl_vil.losses.precision import at_least_fp32


class EMACenter(nn.Module):
    """Center of K teacher logits; all three buffers are persistent (they belong in checkpoints).

    Buffers:
        center: (K,) fp32, the value subtracted from teacher logits.
        pending_sum: (K,) fp32, sum of teacher-logit rows seen since the last commit (this rank).
        pending_count: () fp32, number of rows in ``pending_sum``.
    """

    center: Tensor
    pending_sum: Tensor
    pending_count: Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"center momentum must be in [0, 1], got {momentum!r}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("pending_sum", torch.zeros(dim))
        self.register_buffer("pending_count", torch.zeros(()))

    @torch.no_grad()
    def accumulate(self, logits: Tensor, valid: Tensor | None = None) -> None:
        """Add teacher logits (N, K) to the pending sums; ``valid`` (N,) bool excludes padding rows."""
        x = logits.detach().to(self.pending_sum.dtype)
        if valid is None:
            self.pending_sum.add_(x.sum(dim=0))
            self.pending_count.add_(x.shape[0])
        else:
            w = valid.to(x.dtype)
            self.pending_sum.add_(w @ x)
            self.pending_count.add_(w.sum())

    @torch.no_grad()
    def commit(self) -> None:
        """All-reduce the pending sums over ranks, apply the EMA once, and clear them.

        A step without any rows (count 0 on every rank) leaves the center unchanged. Written without a
        host sync so that it can run on an accelerator inside a captured step.
        """
        all_reduce_(self.pending_sum, "sum")
        all_reduce_(self.pending_count, "sum")
        batch_center = self.pending_sum / self.pending_count.clamp(min=1.0)
        updated = self.center * self.momentum + batch_center * (1.0 - self.momentum)
        self.center.copy_(torch.where(self.pending_count > 0, updated, self.center))
        self.discard()

    @torch.no_grad()
    def discard(self) -> None:
        """Forget the pending sums (skipped optimizer step): the center stays untouched."""
        self.pending_sum.zero_()
        self.pending_count.zero_()

    def extra_repr(self) -> str:
        return f"dim={self.center.shape[0]}, momentum={self.momentum}"


def centered_teacher_probs(logits: Tensor, center: Tensor, teacher_temp: float | Tensor) -> Tensor:
    """softmax((logits - center) / teacher_temp) in at least fp32: (N, K), (K,) -> (N, K)."""
    x = at_least_fp32(logits)
    return F.softmax((x - center.to(x.dtype)) / teacher_temp, dim=-1)
