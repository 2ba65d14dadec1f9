"""DINO image-level self-distillation loss: cross-entropy between teacher and student views.

Inputs are view-major stacks: row ``v * B + b`` holds view ``v`` of image ``b``. Teacher view ``t`` and
student view ``t`` are the same crop (the global crops come first in the student stack), so those pairs are
skipped; the loss is the mean over the remaining (student view, teacher view) pairs of the batch-mean
cross-entropy  -sum_k p_teacher[k] * log softmax(student / student_temp)[k].
With 2 global + 8 local crops that is 2·10 - 2 = 18 pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vil.losses.precision import at_least_fp32


def dino_cross_entropy(
    student_logits: Tensor,
    teacher_probs: Tensor,
    *,
    n_student_views: int,
    n_teacher_views: int,
    student_temp: float = 0.1,
) -> Tensor:
    """Mean cross-view cross-entropy (scalar, computed in at least fp32).

    Args:
        student_logits: (n_student_views * B, K) student head outputs, view-major, global views first.
        teacher_probs: (n_teacher_views * B, K) teacher target distributions (rows sum to 1).
        n_student_views: number of student views (global + local).
        n_teacher_views: number of teacher views (global only).
        student_temp: student softmax temperature.
    """
    if student_logits.ndim != 2 or teacher_probs.ndim != 2:
        raise ValueError(
            f"dino_cross_entropy expects 2-D (views*B, K) inputs, got student {tuple(student_logits.shape)} "
            f"and teacher {tuple(teacher_probs.shape)}"
        )
    if student_logits.shape[0] % n_student_views or teacher_probs.shape[0] % n_teacher_views:
        raise ValueError(
            f"rows must be a multiple of the view count: student {student_logits.shape[0]} rows for "
            f"{n_student_views} views, teacher {teacher_probs.shape[0]} rows for {n_teacher_views} views"
        )
    batch = teacher_probs.shape[0] // n_teacher_views
    if student_logits.shape[0] // n_student_views != batch or student_logits.shape[1] != teacher_probs.shape[1]:
        raise ValueError(
            f"student {tuple(student_logits.shape)} / {n_student_views} views and teacher "
            f"{tuple(teacher_probs.shape)} / {n_teacher_views} views disagree on batch size or K"
        )
    n_diag = min(n_student_views, n_teacher_views)
    n_pairs = n_student_views * n_teacher_views - n_diag
    if n_pairs == 0:
        raise ValueError("the DINO loss needs at least one pair of different views")

    # Autocast would run the einsum (a matmul) in half precision.
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p_student = F.log_softmax(at_least_fp32(student_logits) / student_temp, dim=-1)
        log_p_student = log_p_student.reshape(n_student_views, batch, -1)
        p_teacher = at_least_fp32(teacher_probs).to(log_p_student.dtype).reshape(n_teacher_views, batch, -1)
        # (teacher view, student view) matrix of summed cross-entropies over the batch.
        ce = -torch.einsum("tbk,sbk->ts", p_teacher, log_p_student)
        same_view = torch.eye(n_teacher_views, n_student_views, dtype=torch.bool, device=ce.device)
        ce = ce.masked_fill(same_view, 0.0)
        return ce.sum() / (n_pairs * batch)
