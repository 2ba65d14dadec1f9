"""DINO cross-view loss and EMA centering vs. naive references written from the paper's equations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from lightly.loss import DINOLoss

from ssl_vil.losses import EMACenter, centered_teacher_probs, dino_cross_entropy


def naive_dino_loss(student, teacher, center, n_s, n_t, t_s, t_t):
    """Loops over (teacher view, student view != teacher view, image): mean of -sum_k P_t log P_s."""
    batch = teacher.shape[0] // n_t
    total, n_pairs = 0.0, 0
    for t in range(n_t):
        for s in range(n_s):
            if s == t:
                continue
            n_pairs += 1
            for b in range(batch):
                z_t = [(teacher[t * batch + b, k].item() - center[k].item()) / t_t for k in range(teacher.shape[1])]
                m = max(z_t)
                e_t = [math.exp(z - m) for z in z_t]
                p_t = [e / sum(e_t) for e in e_t]
                z_s = [student[s * batch + b, k].item() / t_s for k in range(student.shape[1])]
                m = max(z_s)
                log_norm = m + math.log(sum(math.exp(z - m) for z in z_s))
                total += -sum(p * (z - log_norm) for p, z in zip(p_t, z_s)) / batch
    return total / n_pairs


GRID = list(
    itertools.product(
        [1, 3, 5],  # batch
        [(2, 2), (6, 2), (4, 1)],  # (student views, teacher views)
        [16, 300],  # K
        [(0.1, 0.04), (0.2, 0.07)],  # (student temp, teacher temp)
    )
)


@pytest.mark.parametrize(("batch", "views", "k", "temps"), GRID)
def test_dino_loss_matches_naive_reference(batch, views, k, temps):
    n_s, n_t = views
    t_s, t_t = temps
    g = torch.Generator().manual_seed(batch * 1000 + n_s * 100 + k)
    student = torch.randn(n_s * batch, k, generator=g, dtype=torch.float64)
    teacher = torch.randn(n_t * batch, k, generator=g, dtype=torch.float64)
    center = 0.3 * torch.randn(k, generator=g, dtype=torch.float64)
    ours = dino_cross_entropy(
        student,
        centered_teacher_probs(teacher, center, t_t),
        n_student_views=n_s,
        n_teacher_views=n_t,
        student_temp=t_s,
    )
    ref = naive_dino_loss(student, teacher, center, n_s, n_t, t_s, t_t)
    assert abs(ours.item() - ref) < 1e-6 * max(1.0, abs(ref))


@pytest.mark.parametrize(("batch", "views", "k", "temps"), GRID[::3])
def test_dino_loss_and_center_match_lightly(batch, views, k, temps):
    n_s, n_t = views
    t_s, t_t = temps
    g = torch.Generator().manual_seed(7 + batch + k)
    student = torch.randn(n_s * batch, k, generator=g, dtype=torch.float64)
    teacher = torch.randn(n_t * batch, k, generator=g, dtype=torch.float64)
    lightly_loss = DINOLoss(output_dim=k, student_temp=t_s, center_momentum=0.9).double()
    theirs = lightly_loss(list(teacher.chunk(n_t)), list(student.chunk(n_s)), teacher_temp=t_t)

    center = EMACenter(k, momentum=0.9).double()
    ours = dino_cross_entropy(
        student,
        centered_teacher_probs(teacher, center.center, t_t),
        n_student_views=n_s,
        n_teacher_views=n_t,
        student_temp=t_s,
    )
    center.accumulate(teacher)
    center.commit()
    assert abs(ours.item() - theirs.item()) < 1e-6
    torch.testing.assert_close(center.center, lightly_loss.center.reshape(-1), rtol=0, atol=1e-12)


def test_dino_loss_fp32_and_bf16_inputs_close_to_fp64():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6 * 4, 4096, generator=g, dtype=torch.float64)
    teacher_probs = torch.softmax(torch.randn(2 * 4, 4096, generator=g, dtype=torch.float64) / 0.04, dim=-1)
    kwargs = dict(n_student_views=6, n_teacher_views=2, student_temp=0.1)
    ref = dino_cross_entropy(student, teacher_probs, **kwargs)
    fp32 = dino_cross_entropy(student.float(), teacher_probs.float(), **kwargs)
    bf16 = dino_cross_entropy(student.bfloat16(), teacher_probs.float(), **kwargs)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.float32
    assert abs(fp32.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert abs(bf16.item() - ref.item()) < 2e-2 * abs(ref.item())


def test_dino_loss_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="multiple of the view count"):
        dino_cross_entropy(torch.randn(7, 8), torch.randn(4, 8), n_student_views=2, n_teacher_views=2)
    with pytest.raises(ValueError, match="disagree"):
        dino_cross_entropy(torch.randn(6, 8), torch.randn(4, 8), n_student_views=2, n_teacher_views=2)
    with pytest.raises(ValueError, match="at least one pair"):
        dino_cross_entropy(torch.randn(2, 8), torch.randn(2, 8), n_student_views=1, n_teacher_views=1)


def test_center_follows_ema_formula_over_three_steps_with_micro_batches():
    g = torch.Generator().manual_seed(3)
    k, momentum = 32, 0.9
    center = EMACenter(k, momentum=momentum)
    expected = torch.zeros(k, dtype=torch.float64)
    for step in range(3):
        micro = [torch.randn(n, k, generator=g) + step for n in (4, 6, 2)]
        before = center.center.clone()
        for m in micro:
            center.accumulate(m)
            assert torch.equal(center.center, before), "the center must not move before commit"
        center.commit()
        rows = torch.cat(micro).double()
        expected = momentum * expected + (1 - momentum) * rows.mean(dim=0)
        torch.testing.assert_close(center.center.double(), expected, rtol=0, atol=1e-6)
        assert center.pending_count.item() == 0 and center.pending_sum.abs().sum().item() == 0


def test_center_ignores_padding_rows_and_discard_keeps_center():
    center = EMACenter(4, momentum=0.5)
    rows = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0], [100.0, 100.0, 100.0, 100.0]])
    center.accumulate(rows, valid=torch.tensor([True, True, False]))
    center.commit()
    torch.testing.assert_close(center.center, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    center.accumulate(rows)
    center.discard()
    torch.testing.assert_close(center.center, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    center.commit()  # nothing pending: unchanged
    torch.testing.assert_close(center.center, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert set(center.state_dict()) == {"center", "pending_sum", "pending_count"}


def test_dino_loss_stays_fp32_under_autocast():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(8, 512, generator=g)
    teacher_probs = torch.softmax(torch.randn(4, 512, generator=g) / 0.04, dim=-1)
    kwargs = dict(n_student_views=4, n_teacher_views=2, student_temp=0.1)
    plain = dino_cross_entropy(student, teacher_probs, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = dino_cross_entropy(student, teacher_probs, **kwargs)
    assert amp.dtype == torch.float32 and torch.equal(amp, plain)
