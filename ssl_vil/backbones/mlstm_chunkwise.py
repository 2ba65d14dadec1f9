"""Chunkwise mLSTM: the same function as ``mlstm_parallel`` in time and memory linear in the sequence length.

The sequence is split into ``NC`` chunks of ``L`` tokens. Inside a chunk the stabilised parallel form is used
(L x L matrices); across chunks a recurrent matrix memory C (DH x DHV), normaliser n (DH) and max state m
(scalar, log space) carry the past. Everything is plain differentiable torch, so autograd gives the exact
gradient of this computation, which equals the parallel form's gradient up to floating-point round-off.

Exactness notes:
  * The max state starts at -inf (no past), so m_t equals the parallel row maximum max_s log D[t, s] exactly;
    this matters because m enters the output through the ``exp(-m)`` floor of the normaliser and through eps.
  * A length that is not a multiple of the chunk length is padded at the *end*; since the cell is causal the
    padded tokens never influence real outputs and are sliced off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def chunk_layout(seqlen: int, chunk_size: int) -> tuple[int, int]:
    """(number of chunks, chunk length) for ``seqlen`` tokens and a maximum chunk length ``chunk_size``.

    The chunk length is shrunk below ``chunk_size`` to minimise end padding (196 tokens -> 4 x 49).
    """
    if seqlen < 1 or chunk_size < 1:
        raise ValueError(f"seqlen and chunk_size must be positive, got seqlen={seqlen}, chunk_size={chunk_size}")
    num_chunks = math.ceil(seqlen / chunk_size)
    return num_chunks, math.ceil(seqlen / num_chunks)


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate_preact: torch.Tensor,
    fgate_preact: torch.Tensor,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Chunkwise stabilised mLSTM (same arguments and result as ``mlstm_parallel``).

    Args:
        q, k: (B, NH, S, DH); v: (B, NH, S, DHV); igate_preact, fgate_preact: (B, NH, S).
        eps: normaliser eps (added after the max).
        chunk_size: maximum chunk length L; memory is O(S * L + S / L * DH * DHV) per head.

    Returns:
        h: (B, NH, S, DHV).
    """
    batch, num_heads, seqlen, head_dim = q.shape
    value_dim = v.shape[-1]
    num_chunks, chunk_len = chunk_layout(seqlen, chunk_size)
    pad = num_chunks * chunk_len - seqlen
    if pad:
        # Any finite values work: padded tokens sit after every real token and are discarded.
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        igate_preact, fgate_preact = (F.pad(t, (0, pad)) for t in (igate_preact, fgate_preact))

    shape = (batch, num_heads, num_chunks, chunk_len)
    q = q.reshape(*shape, head_dim)
    k = (k / math.sqrt(head_dim)).reshape(*shape, head_dim)
    v = v.reshape(*shape, value_dim)
    igate = igate_preact.reshape(shape)
    # log_fgate_cumsum[..., j] = sum of log forget gates of chunk tokens 0..j (inclusive)
    log_fgate_cumsum = torch.cumsum(F.logsigmoid(fgate_preact).reshape(shape), dim=-1)
    log_fgate_chunk = log_fgate_cumsum[..., -1]  # (B, NH, NC): decay across a whole chunk

    # --- inter-chunk recurrence: the state entering every chunk -------------------------------------------
    # Weight (log space) of token s in the state at the end of its own chunk.
    log_w_end = log_fgate_chunk.unsqueeze(-1) - log_fgate_cumsum + igate
    local_max = log_w_end.amax(dim=-1)  # (B, NH, NC)
    k_weighted = k * torch.exp(log_w_end - local_max.unsqueeze(-1)).unsqueeze(-1)
    local_c = k_weighted.transpose(-2, -1) @ v  # (B, NH, NC, DH, DHV), scaled by exp(-local_max)
    local_n = k_weighted.sum(dim=-2)  # (B, NH, NC, DH)

    # No state enters chunk 0: m = -inf, C = n = 0 (see the module docstring).
    m_states = [torch.full_like(local_max[..., 0], float("-inf"))]
    c_states = [torch.zeros_like(local_c[:, :, 0])]
    n_states = [torch.zeros_like(local_n[:, :, 0])]
    if num_chunks > 1:
        m_prev, c_prev, n_prev = local_max[..., 0], local_c[:, :, 0], local_n[:, :, 0]
        m_states.append(m_prev)
        c_states.append(c_prev)
        n_states.append(n_prev)
        for chunk in range(1, num_chunks - 1):
            decayed = log_fgate_chunk[..., chunk] + m_prev
            m_new = torch.maximum(decayed, local_max[..., chunk])
            scale_prev = torch.exp(decayed - m_new)
            scale_local = torch.exp(local_max[..., chunk] - m_new)
            c_prev = scale_prev[..., None, None] * c_prev + scale_local[..., None, None] * local_c[:, :, chunk]
            n_prev = scale_prev[..., None] * n_prev + scale_local[..., None] * local_n[:, :, chunk]
            m_prev = m_new
            m_states.append(m_prev)
            c_states.append(c_prev)
            n_states.append(n_prev)
    m_in = torch.stack(m_states, dim=2)  # (B, NH, NC)
    c_in = torch.stack(c_states, dim=2)  # (B, NH, NC, DH, DHV)
    n_in = torch.stack(n_states, dim=2)  # (B, NH, NC, DH)

    # --- outputs: intra-chunk parallel part + decayed incoming state ---------------------------------------
    causal = torch.ones(chunk_len, chunk_len, dtype=torch.bool, device=q.device).tril()
    log_decay = log_fgate_cumsum.unsqueeze(-1) - log_fgate_cumsum.unsqueeze(-2)
    log_decay = torch.where(causal, log_decay + igate.unsqueeze(-2), float("-inf"))  # (B, NH, NC, L, L)
    log_state = log_fgate_cumsum + m_in.unsqueeze(-1)  # (B, NH, NC, L): log scale of the incoming state
    max_log = torch.maximum(log_decay.amax(dim=-1), log_state)  # m_t, identical to the parallel row max
    weights = (q @ k.transpose(-2, -1)) * torch.exp(log_decay - max_log.unsqueeze(-1))
    state_scale = torch.exp(log_state - max_log)
    numerator = weights @ v + state_scale.unsqueeze(-1) * (q @ c_in)
    denominator = weights.sum(dim=-1) + state_scale * (q @ n_in.unsqueeze(-1)).squeeze(-1)
    normalizer = torch.maximum(denominator.abs(), torch.exp(-max_log))
    h = numerator / (normalizer + eps).unsqueeze(-1)
    h = h.reshape(batch, num_heads, num_chunks * chunk_len, value_dim)
    return h[:, :, :seqlen] if pad else h
