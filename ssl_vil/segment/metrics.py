"""Segmentation metrics from a confusion matrix: per-class IoU and accuracy, mIoU, pixel accuracy.

mIoU is the mean IoU over the classes that occur in the ground truth or the predictions (union > 0), the mmseg
convention; a class absent from both is reported as null, not as 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ssl_vil.infra.dist import all_reduce_


class ConfusionMatrix:
    """Counts (K, K): rows ground truth, columns prediction; pixels labelled ``ignore_index`` are left out."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu") -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer tensors of one shape (B, H, W) or (H, W)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != mask shape {tuple(target.shape)}")
        valid = target != self.ignore_index
        k = self.num_classes
        index = target[valid].long() * k + pred[valid].long()
        self.counts += torch.bincount(index, minlength=k * k).reshape(k, k).to(self.counts.device)

    def all_reduce(self) -> None:
        """Sum the counts over ranks (no-op outside a process group)."""
        all_reduce_(self.counts)

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """``{"miou", "pixel_acc", "macc", "per_class": [{"name", "iou", "acc", "pixels"}, ...]}`` in percent."""
        counts = self.counts.double()
        true_pos = counts.diag()
        gt = counts.sum(1)
        union = gt + counts.sum(0) - true_pos
        iou = torch.where(union > 0, true_pos / union.clamp(min=1), torch.nan)
        acc = torch.where(gt > 0, true_pos / gt.clamp(min=1), torch.nan)
        total = float(gt.sum())
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]

        def pct(value: torch.Tensor) -> float | None:
            return None if bool(torch.isnan(value)) else 100.0 * float(value)

        return {
            "miou": pct(iou.nanmean()) if bool((union > 0).any()) else None,
            "macc": pct(acc.nanmean()) if bool((gt > 0).any()) else None,
            "pixel_acc": 100.0 * float(true_pos.sum()) / total if total else None,
            "pixels": int(total),
            "per_class": [{"name": names[i], "iou": pct(iou[i]), "acc": pct(acc[i]), "pixels": int(gt[i])}
                          for i in range(self.num_classes)],
        }
