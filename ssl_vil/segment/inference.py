"""Prediction over a whole image, or by overlapping windows (the mmseg "slide" mode) for images larger than the
training crop: window logits are summed where windows overlap and divided by the number of windows per pixel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def predict_whole(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """image (B, 3, H, W) -> logits (B, K, H, W)."""
    return model(image)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` px at ``stride`` covering ``length`` px (the last one flush with
    the end); one window at 0 when the image is not longer than a window."""
    if length <= window:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def predict_slide(model: nn.Module, image: torch.Tensor, window: int, stride: int, num_classes: int
                  ) -> torch.Tensor:
    """image (B, 3, H, W) -> logits (B, K, H, W) from ``window`` x ``window`` crops at ``stride``.

    An image smaller than a window is padded at the bottom / right (zeros = the mean colour) and the padding cut
    from the result.
    """
    batch, _, height, width = image.shape
    pad_h, pad_w = max(0, window - height), max(0, window - width)
    padded = F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image
    full_h, full_w = padded.shape[-2:]
    logits = padded.new_zeros(batch, num_classes, full_h, full_w, dtype=torch.float32)
    hits = padded.new_zeros(1, 1, full_h, full_w, dtype=torch.float32)
    for top in window_starts(full_h, window, stride):
        for left in window_starts(full_w, window, stride):
            crop = padded[:, :, top:top + window, left:left + window]
            logits[:, :, top:top + window, left:left + window] += model(crop).float()
            hits[:, :, top:top + window, left:left + window] += 1
    return (logits / hits)[:, :, :height, :width]
