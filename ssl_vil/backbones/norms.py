"""LayerNorm flavours of the Vision-LSTM backbone.

The official ViL stores most norm scales as a *delta from one* (the effective scale is ``1 + weight``), so that
a zero-initialised weight is the identity scale. These modules keep that parametrisation so that official
state_dicts load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualLayerNorm(nn.Module):
    """LayerNorm over the last dim with scale ``1 + weight`` (weight initialised to zero).

    Input/output: (..., dim).
    """

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), weight=1.0 + self.weight, bias=self.bias, eps=self.eps)


class MultiHeadLayerNorm(nn.Module):
    """Per-head LayerNorm of the mLSTM cell output (a group norm with one group per head).

    Input: (B, NH, S, DH); output: (B, S, NH * DH) with heads merged head-major. The affine scale is
    ``1 + weight`` over all NH * DH channels.
    """

    def __init__(self, num_heads: int, dim: int, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_heads, seqlen, head_dim = x.shape
        x = x.transpose(1, 2).reshape(batch * seqlen, num_heads * head_dim)
        x = F.group_norm(x, num_groups=num_heads, weight=1.0 + self.weight, bias=self.bias, eps=self.eps)
        return x.view(batch, seqlen, num_heads * head_dim)
