"""Parallel (quadratic) stabilised mLSTM: the form the official Vision-LSTM trains and evaluates with.

All S x S gate/attention-like matrices are materialised, so time is O(S^2 * DH) and memory O(S^2) per head.
Kept for exact parity with the official model; ``mlstm_chunkwise`` computes the same function in linear time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate_preact: torch.Tensor,
    fgate_preact: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Stabilised parallel mLSTM.

    Args:
        q, k: (B, NH, S, DH) queries / keys (keys are scaled by DH^-0.5 here).
        v: (B, NH, S, DHV) values.
        igate_preact, fgate_preact: (B, NH, S) gate pre-activations; the input gate is exponential, the forget
            gate is ``sigmoid`` (used in log space).
        eps: added to the normaliser after the max.

    Returns:
        h: (B, NH, S, DHV).
    """
    seqlen, head_dim = q.shape[-2], q.shape[-1]
    log_fgate = F.logsigmoid(fgate_preact)
    log_fgate_cumsum = torch.cumsum(log_fgate, dim=-1)
    # log_decay[t, s] = sum_{s < u <= t} log f_u + i_s for s <= t
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
    log_decay = log_fgate_cumsum.unsqueeze(-1) - log_fgate_cumsum.unsqueeze(-2)
    log_decay = torch.where(causal, log_decay + igate_preact.unsqueeze(-2), float("-inf"))
    # Row-wise stabiliser: the parallel analogue of the recurrent max state m_t.
    max_log_decay = log_decay.amax(dim=-1, keepdim=True)
    decay = torch.exp(log_decay - max_log_decay)
    scores = q @ (k / math.sqrt(head_dim)).transpose(-2, -1)
    weights = scores * decay
    normalizer = torch.maximum(weights.sum(dim=-1, keepdim=True).abs(), torch.exp(-max_log_decay))
    return (weights / (normalizer + eps)) @ v
