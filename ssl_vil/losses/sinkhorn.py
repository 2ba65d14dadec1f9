"""Sinkhorn-Knopp teacher normalisation (SwAV / DINOv2 ``centering: sinkhorn_knopp``).

Finds Q (N, K) close to softmax(logits / T) such that every sample's row sums to 1 and every prototype
receives the same total mass N / K (approximately, after a few iterations), where N counts the valid rows of
*all* ranks: mass sums are all-reduced when a process group exists, so the result equals running on the
concatenated global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_vil.infra.dist import all_reduce_
from ssl_vil.losses.precision import at_least_fp32


@torch.no_grad()
def sinkhorn_knopp(
    logits: Tensor,
    teacher_temp: float | Tensor,
    n_iterations: int = 3,
    valid: Tensor | None = None,
) -> Tensor:
    """Teacher targets (N, K) from logits (N, K); rows sum to 1, padding rows (``valid`` False) are 0.

    Each iteration first rescales prototypes (columns) to mass 1/K, then samples (rows) to mass 1/N, as in
    DINOv2, so after the last iteration the rows are exactly normalised.
    """
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    x = at_least_fp32(logits) / teacher_temp
    n_protos = x.shape[1]
    if valid is None:
        valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    # Padding rows become -inf so that they contribute exactly 0 mass. Subtracting the global max does not
    # change the result (every normalisation divides it out) but keeps exp() finite for large logits.
    x = torch.where(valid[:, None], x, torch.full_like(x, float("-inf")))
    if x.shape[0] > 0:
        shift = x.amax().reshape(1)
    else:
        shift = torch.full((1,), float("-inf"), dtype=x.dtype, device=x.device)
    all_reduce_(shift, "max")
    shift = torch.nan_to_num(shift, neginf=0.0)
    q = torch.exp(x - shift)

    n_rows = valid.sum().to(x.dtype).reshape(1)
    all_reduce_(n_rows, "sum")
    total = q.sum().reshape(1)
    all_reduce_(total, "sum")
    q = q / total.clamp(min=torch.finfo(x.dtype).tiny)
    for _ in range(n_iterations):
        proto_mass = q.sum(dim=0, keepdim=True)
        all_reduce_(proto_mass, "sum")
        q = q / proto_mass.clamp(min=torch.finfo(x.dtype).tiny) / n_protos
        sample_mass = q.sum(dim=1, keepdim=True)
        q = q / sample_mass.clamp(min=torch.finfo(x.dtype).tiny) / n_rows
    return q * n_rows
