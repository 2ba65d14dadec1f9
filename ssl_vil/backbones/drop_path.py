"""Stochastic depth as in the official ViL ("efficient" drop path on a residual branch)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ResidualDropPath(nn.Module):
    """Computes ``x + branch(x)``, dropping the branch for a random subset of samples while training.

    The branch runs only on ``keep = max(int(B * (1 - p)), 1)`` randomly chosen samples and their result is
    scaled by ``B / keep`` (saves the compute of dropped samples). If that realised keep ratio is more than 0.01
    away from ``1 - p`` (small batches), it falls back to a per-sample Bernoulli mask scaled by ``1 / (1 - p)``.
    Identity branch-add in eval mode or when p == 0. Input/output (B, ...).
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x + branch(x)
        keep_prob = 1.0 - self.drop_prob
        batch = x.shape[0]
        keep = max(int(batch * keep_prob), 1)
        if abs(keep / batch - keep_prob) > 0.01:
            mask = x.new_empty((batch,) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
            return x + branch(x) * (mask / keep_prob)
        kept = torch.randperm(batch, device=x.device)[:keep]
        return torch.index_add(x, 0, kept, branch(x[kept]), alpha=batch / keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_path_rates(depth: int, rate: float, mode: str = "uniform") -> list[float]:
    """Per-block drop-path rates: ``uniform`` (every block ``rate``) or ``linear`` (0 -> ``rate`` over the blocks;
    a single block gets ``rate``)."""
    if mode == "uniform":
        return [rate] * depth
    if mode == "linear":
        return [rate * i / (depth - 1) if depth > 1 else rate for i in range(depth)]
    raise ValueError(f"drop-path mode must be 'uniform' or 'linear', got {mode!r}")
