"""iBOT masked-patch self-distillation loss with DINOv2's normalisation.

For every masked patch m of image i the cross-entropy  CE_m = -sum_k p_teacher[m, k] log softmax(s_m / T_s)[k]
is weighted by 1 / (number of masked patches of image i); the weighted sum is divided by the number of
*all* global images (masked or not). The loss is therefore the mean over images of the per-image mean CE,
with unmasked images counting as 0 (about half the per-masked-image mean at mask probability 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vil.losses.precision import at_least_fp32


def ibot_patch_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    weights: Tensor,
    n_images: int,
    student_temp: float = 0.1,
) -> Tensor:
    """Masked-patch cross-entropy (scalar, computed in at least fp32).

    Args:
        student_logits: (M, K) student head outputs at the masked positions (M may include padding rows).
        teacher_probs: (M, K) teacher targets at the same positions.
        weights: (M,) 1 / (masked patches in the row's image); 0 for padding rows.
        n_images: number of global images the masks were drawn for (n_global_views * B).
        student_temp: student softmax temperature.
    """
    if student_logits.shape != teacher_probs.shape or weights.shape != student_logits.shape[:1]:
        raise ValueError(
            f"ibot_patch_loss shape mismatch: student {tuple(student_logits.shape)}, teacher "
            f"{tuple(teacher_probs.shape)}, weights {tuple(weights.shape)}"
        )
    if n_images < 1:
        raise ValueError(f"ibot_patch_loss needs n_images >= 1, got {n_images}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p_student = F.log_softmax(at_least_fp32(student_logits) / student_temp, dim=-1)
        ce = -(at_least_fp32(teacher_probs).to(log_p_student.dtype) * log_p_student).sum(dim=-1)
        return (ce * weights.to(ce.dtype)).sum() / n_images
