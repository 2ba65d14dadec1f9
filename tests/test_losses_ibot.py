"""iBOT masked-patch loss (DINOv2 normalisation) vs. a per-image loop reference and lightly's IBOTPatchLoss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from lightly.loss import IBOTPatchLoss

from ssl_vil.losses import centered_teacher_probs, ibot_patch_loss
from ssl_vil.objectives.masking import mask_index_buffers


def naive_ibot_loss(student_tokens, teacher_tokens, masks, center, t_s, t_t):
    """sum over images of (mean over that image's masked patches of CE) / number of images.

    student_tokens / teacher_tokens: (N, S, K) logits of every patch; masks: (N, S) bool.
    """
    n_images, n_patches, k = student_tokens.shape
    total = 0.0
    for i in range(n_images):
        positions = [s for s in range(n_patches) if masks[i, s]]
        per_image = 0.0
        for s in positions:
            z_t = [(teacher_tokens[i, s, j].item() - center[j].item()) / t_t for j in range(k)]
            m = max(z_t)
            e = [math.exp(z - m) for z in z_t]
            p = [v / sum(e) for v in e]
            z_s = [student_tokens[i, s, j].item() / t_s for j in range(k)]
            m = max(z_s)
            log_norm = m + math.log(sum(math.exp(z - m) for z in z_s))
            per_image += -sum(pj * (zj - log_norm) for pj, zj in zip(p, z_s))
        if positions:
            total += per_image / len(positions)
    return total / n_images


def _random_masks(g, n_images, n_patches):
    masks = torch.rand(n_images, n_patches, generator=g) < 0.3
    masks[0] = False  # an unmasked image still counts in the denominator
    masks[-1, :2] = True
    return masks


GRID = list(itertools.product([2, 5], [16, 36], [8, 64], [(0.1, 0.04), (0.2, 0.07)]))


@pytest.mark.parametrize(("n_images", "n_patches", "k", "temps"), GRID)
def test_ibot_loss_matches_naive_reference_with_padded_buffers(n_images, n_patches, k, temps):
    t_s, t_t = temps
    g = torch.Generator().manual_seed(n_images * 1000 + n_patches * 10 + k)
    masks = _random_masks(g, n_images, n_patches)
    student_tokens = torch.randn(n_images, n_patches, k, generator=g, dtype=torch.float64)
    teacher_tokens = torch.randn(n_images, n_patches, k, generator=g, dtype=torch.float64)
    center = 0.2 * torch.randn(k, generator=g, dtype=torch.float64)
    n_masked = int(masks.sum())
    indices, weights, count = mask_index_buffers(masks, upper_bound=n_masked + 7)
    assert count.item() == n_masked
    # Static buffers: padding rows gather token 0 and must contribute nothing.
    student = student_tokens.flatten(0, 1)[indices]
    teacher = teacher_tokens.flatten(0, 1)[indices]
    ours = ibot_patch_loss(student, centered_teacher_probs(teacher, center, t_t), weights, n_images, t_s)
    ref = naive_ibot_loss(student_tokens, teacher_tokens, masks, center, t_s, t_t)
    assert abs(ours.item() - ref) < 1e-6 * max(1.0, abs(ref))


@pytest.mark.parametrize(("n_images", "n_patches", "k", "temps"), GRID[::2])
def test_ibot_loss_matches_lightly(n_images, n_patches, k, temps):
    t_s, t_t = temps
    g = torch.Generator().manual_seed(5 + n_images + k)
    side = int(math.isqrt(n_patches))
    masks = _random_masks(g, n_images, n_patches)
    n_masked = int(masks.sum())
    student = torch.randn(n_masked, k, generator=g, dtype=torch.float64)
    teacher = torch.randn(n_masked, k, generator=g, dtype=torch.float64)
    lightly_loss = IBOTPatchLoss(output_dim=k, student_temp=t_s).double()
    theirs = lightly_loss(teacher, student, masks.reshape(n_images, side, side), teacher_temp=t_t)
    _, weights, _ = mask_index_buffers(masks, upper_bound=n_masked)
    ours = ibot_patch_loss(student, centered_teacher_probs(teacher, torch.zeros(k), t_t), weights, n_images, t_s)
    assert abs(ours.item() - theirs.item()) < 1e-6


def test_ibot_loss_shape_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        ibot_patch_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(3), n_images=2)
    with pytest.raises(ValueError, match="n_images"):
        ibot_patch_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(4), n_images=0)
