"""KoLeo regulariser (Sablayrolles et al. 2019): spread features by their nearest-neighbour distance.

    L = -1/B * sum_i log d_i,   d_i = min_{j != i} || x_i/|x_i| - x_j/|x_j| ||_2

computed in fp32 with autocast disabled (fp16 distances of near-duplicates underflow to 0 and give inf).
``d_i`` is floored smoothly as sqrt(||.||^2 + eps^2), so exact duplicates give the finite value -log(eps)
and a zero (not NaN) gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vil.losses.precision import at_least_fp32


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo loss of features (B, D) over the local batch; scalar in at least fp32. Needs B >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs features of shape (B >= 2, D), got {tuple(features.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(at_least_fp32(features), dim=-1, p=2.0, eps=eps)
        with torch.no_grad():
            similarity = x @ x.t()
            similarity.fill_diagonal_(float("-inf"))
            neighbour = similarity.argmax(dim=1)
        squared = (x - x[neighbour]).pow(2).sum(dim=-1)
        distance = torch.sqrt(squared + eps * eps)
        return -torch.log(distance).mean()
