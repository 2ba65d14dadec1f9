"""Sinkhorn-Knopp teacher targets vs. a loop-based reference; marginals; padding rows."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ssl_vil.losses import sinkhorn_knopp


def naive_sinkhorn(logits, temp, n_iterations):
    """Plain-Python SK on lists: Q = exp(logits/T) normalised to total 1, then alternately every prototype
    (column) to mass 1/K and every sample (row) to mass 1/N; finally rows scaled to sum 1."""
    n, k = logits.shape
    q = [[math.exp(logits[i, j].item() / temp) for j in range(k)] for i in range(n)]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(n_iterations):
        col = [sum(q[i][j] for i in range(n)) for j in range(k)]
        q = [[q[i][j] / col[j] / k for j in range(k)] for i in range(n)]
        row = [sum(q[i]) for i in range(n)]
        q = [[q[i][j] / row[i] / n for j in range(k)] for i in range(n)]
    return torch.tensor([[v * n for v in row] for row in q], dtype=torch.float64)


@pytest.mark.parametrize(
    ("n", "k", "temp", "iters"), list(itertools.product([1, 6, 24], [8, 50], [0.04, 0.1], [1, 3]))
)
def test_sinkhorn_matches_naive_reference(n, k, temp, iters):
    g = torch.Generator().manual_seed(n * 100 + k)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.5
    ours = sinkhorn_knopp(logits, temp, n_iterations=iters)
    torch.testing.assert_close(ours, naive_sinkhorn(logits, temp, iters), rtol=1e-6, atol=1e-9)


def test_sinkhorn_rows_sum_to_one_and_columns_balance():
    g = torch.Generator().manual_seed(0)
    n, k = 64, 16
    # Skewed logits: a plain softmax gives some prototypes far more mass than others.
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.2 + torch.linspace(0, 0.5, k, dtype=torch.float64)
    for iters in (3, 200):
        q = sinkhorn_knopp(logits, 0.1, n_iterations=iters)
        torch.testing.assert_close(q.sum(dim=1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
        assert (q >= 0).all()
    softmax_cols = torch.softmax(logits / 0.1, dim=1).sum(dim=0)
    sk3_cols = sinkhorn_knopp(logits, 0.1, n_iterations=3).sum(dim=0)
    assert (sk3_cols - n / k).abs().max() < 0.1 * (softmax_cols - n / k).abs().max()
    converged = sinkhorn_knopp(logits, 0.1, n_iterations=200).sum(dim=0)
    torch.testing.assert_close(converged, torch.full((k,), n / k, dtype=torch.float64), rtol=0, atol=1e-9)


def test_sinkhorn_padding_rows_are_ignored():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 12, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True, False, True, True, True, False, True])
    padded = logits.clone()
    padded[~valid] = 1e4  # garbage that would dominate if it leaked in
    ours = sinkhorn_knopp(padded, 0.05, 3, valid=valid)
    torch.testing.assert_close(ours[valid], sinkhorn_knopp(logits[valid], 0.05, 3), rtol=1e-12, atol=1e-12)
    assert torch.equal(ours[~valid], torch.zeros(3, 12, dtype=torch.float64))


def test_sinkhorn_stable_for_large_logits_and_half_inputs():
    logits = torch.randn(8, 32) * 50.0
    q = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.isfinite(q).all()
    q_half = sinkhorn_knopp(logits.to(torch.bfloat16), 0.04, 3)
    assert q_half.dtype == torch.float32 and torch.isfinite(q_half).all()
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(logits, 0.04, 0)
