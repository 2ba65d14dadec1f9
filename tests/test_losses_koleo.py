"""KoLeo vs. a loop reference over nearest neighbours; lightly parity; duplicate and half-precision safety."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from lightly.loss import KoLeoLoss

from ssl_vil.losses import koleo_loss


def naive_koleo(x, eps):
    """-1/B sum_i log(min_{j != i} ||x_i/|x_i| - x_j/|x_j|||), distances floored as sqrt(d^2 + eps^2)."""
    rows = [[v.item() for v in row] for row in x]
    unit = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        unit.append([v / max(norm, eps) for v in row])
    total = 0.0
    for i, a in enumerate(unit):
        nearest = min(sum((p - q) ** 2 for p, q in zip(a, b)) for j, b in enumerate(unit) if j != i)
        total += -math.log(math.sqrt(nearest + eps * eps))
    return total / len(unit)


@pytest.mark.parametrize(("batch", "dim", "scale"), list(itertools.product([2, 5, 16], [3, 64], [1e-3, 1.0, 50.0])))
def test_koleo_matches_naive_reference(batch, dim, scale):
    g = torch.Generator().manual_seed(batch * 100 + dim)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64) * scale
    assert abs(koleo_loss(x, eps=1e-8).item() - naive_koleo(x, 1e-8)) < 1e-6


@pytest.mark.parametrize(("batch", "dim"), [(4, 8), (16, 64), (33, 128)])
def test_koleo_matches_lightly_without_duplicates(batch, dim):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    assert abs(koleo_loss(x).item() - KoLeoLoss()(x).item()) < 1e-6


def test_koleo_duplicates_are_finite_with_finite_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g)
    x[3] = x[1]  # a duplicated image
    x[5] = x[1] * 2.0  # same direction: identical after normalisation
    x.requires_grad_(True)
    loss = koleo_loss(x, eps=1e-8)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert abs(loss.item() - naive_koleo(x.detach().double(), 1e-8)) < 1e-4
    # Each of the 3 duplicates contributes -log(eps) / 6.
    assert loss.item() > 3 * -math.log(1e-8) / 6 - 5.0


def test_koleo_half_precision_inputs_and_autocast_are_finite():
    x = torch.randn(8, 16).to(torch.float16)
    x[2] = x[0]
    out = koleo_loss(x)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = koleo_loss(torch.randn(8, 16, requires_grad=True))
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_koleo_needs_two_samples():
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))
