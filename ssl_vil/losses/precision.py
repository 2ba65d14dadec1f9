"""Loss arithmetic runs in at least fp32: half-precision softmax over tens of thousands of prototypes and
half-precision distances lose the small values the losses depend on. fp64 inputs stay fp64."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` unchanged if fp32/fp64, else cast to fp32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
