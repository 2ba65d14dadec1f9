"""Chunkwise mLSTM: the same function as ``mlstm_parallel`` in time and memory linear in the sequence length.

The sequence is split into ``NC`` chunks of ``L`` tokens. Inside a chunk the stabilised parallel form is used
(L x L matrices); across chunks a recurrent matrix memory C (DH x DHV), normaliser n (DH) and max state m
(scalar, log space) carry the past. The max states of all chunks come from one running max (``cummax``), so
the only sequential part is the linear state update, one fused multiply-add per chunk. Everything is plain
differentiable torch, so autograd gives the exact gradient of this computation, which equals the parallel
form's gradient up to floating-point round-off.

Exactness notes:
  * The max state starts at -inf (no past), so m_t is the parallel row maximum max_s log D[t, s] (up to
    round-off), not a clipped version of it; this matters because m enters the output through the
    ``exp(-m)`` floor of the normaliser and through eps.
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
    # A ones column appended to v makes every "@ v" also produce the normaliser sum (one matmul for both).
    v_ext = torch.cat([v.reshape(*shape, value_dim), v.new_ones(*shape, 1)], dim=-1)
    igate = igate_preact.reshape(shape)
    # log_fgate_cumsum[..., j] = sum of log forget gates of chunk tokens 0..j (inclusive)
    log_fgate_cumsum = torch.cumsum(F.logsigmoid(fgate_preact).reshape(shape), dim=-1)
    causal = torch.ones(chunk_len, chunk_len, dtype=torch.bool, device=q.device).tril()
    log_decay = log_fgate_cumsum.unsqueeze(-1) - log_fgate_cumsum.unsqueeze(-2)
    log_decay = torch.where(causal, log_decay + igate.unsqueeze(-2), float("-inf"))  # (B, NH, NC, L, L)
    intra_max = log_decay.amax(dim=-1)  # (B, NH, NC, L)

    if num_chunks == 1:
        max_log = intra_max
        out = ((q @ k.transpose(-2, -1)) * torch.exp(log_decay - max_log.unsqueeze(-1))) @ v_ext
    else:
        # --- inter-chunk recurrence: the (stabilised) state [C | n] entering every chunk ---------------------
        log_fgate_chunk = log_fgate_cumsum[..., -1]  # (B, NH, NC): decay across a whole chunk
        # Weight (log space) of token s in the state at the end of its own chunk, and its chunk maximum.
        log_w_end = log_fgate_chunk.unsqueeze(-1) - log_fgate_cumsum + igate
        local_max = log_w_end.amax(dim=-1)  # (B, NH, NC)
        k_weighted = k * torch.exp(log_w_end - local_max.unsqueeze(-1)).unsqueeze(-1)
        local_state = k_weighted.transpose(-2, -1) @ v_ext  # (B, NH, NC, DH, DHV + 1), scaled exp(-local_max)
        # Max state after chunk c: max over c' <= c of (decay from the end of c' to the end of c) + local_max[c'],
        # i.e. a running max of local_max - cumulative decay; the state entering chunk 0 has m = -inf.
        total_decay = torch.cumsum(log_fgate_chunk, dim=-1)
        m_after = total_decay + torch.cummax(local_max - total_decay, dim=-1).values
        m_in = torch.cat([torch.full_like(m_after[..., :1], float("-inf")), m_after[..., :-1]], dim=-1)
        scale_prev = torch.exp(log_fgate_chunk + m_in - m_after)  # old state decayed through chunk c
        local_state = local_state * torch.exp(local_max - m_after)[..., None, None]
        # unbind once: indexing a chunk inside the loop makes autograd add a zero tensor of the whole state per
        # chunk in the backward, a cost quadratic in the number of chunks.
        local_chunks = local_state.unbind(dim=2)
        scale_chunks = scale_prev[..., None, None].unbind(dim=2)
        states = [torch.zeros_like(local_chunks[0]), local_chunks[0]]
        for chunk in range(1, num_chunks - 1):
            states.append(torch.addcmul(local_chunks[chunk], scale_chunks[chunk], states[-1]))
        state_in = torch.stack(states, dim=2)  # (B, NH, NC, DH, DHV + 1)

        # --- outputs: intra-chunk parallel part + decayed incoming state -------------------------------------
        log_state = log_fgate_cumsum + m_in.unsqueeze(-1)  # (B, NH, NC, L): log scale of the incoming state
        max_log = torch.maximum(intra_max, log_state)  # m_t, equal to the parallel row maximum
        weights = (q @ k.transpose(-2, -1)) * torch.exp(log_decay - max_log.unsqueeze(-1))
        out = weights @ v_ext + torch.exp(log_state - max_log).unsqueeze(-1) * (q @ state_in)
    numerator, denominator = out[..., :value_dim], out[..., value_dim]
    normalizer = torch.maximum(denominator.abs(), torch.exp(-max_log))
    h = numerator / (normalizer + eps).unsqueeze(-1)
    h = h.reshape(batch, num_heads, num_chunks * chunk_len, value_dim)
    return h[:, :, :seqlen] if pad else h
