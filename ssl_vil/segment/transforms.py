"""Joint image / mask transforms: the geometry applied to an image is applied to its mask, with nearest-neighbour
resampling so mask values stay class indices.

Train: random rescale (factor drawn from ``scale_range``, relative to ``base_size`` or the image's own size), pad to
the crop with the ignore index (mask) and the mean colour (image, i.e. zero after normalisation), random crop,
horizontal flip. Eval: optional resize to ``base_size`` on the short side, nothing random. Every draw comes from
the ``torch.Generator`` passed in, which the stream seeds per sample, so a view is a function of its seed only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _resize(image: Image.Image, mask: np.ndarray, size: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
    """Resize to (width, height): bilinear image, nearest mask."""
    if image.size == size:
        return image, mask
    resized_mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return image.resize(size, Image.BILINEAR), resized_mask


def short_side_size(size: tuple[int, int], short: float) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is ``short`` (rounded, at least 1 px)."""
    width, height = size
    factor = short / min(width, height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def normalize(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float, ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class SegTrainTransform:
    """(RGB image, (H, W) uint8 mask, generator) -> image (3, crop, crop) float, mask (crop, crop) int64."""

    def __init__(self, crop_size: int, scale_range: Sequence[float], base_size: int | None, hflip: float,
                 mean: Sequence[float], std: Sequence[float], ignore_index: int) -> None:
        self.crop_size, self.scale_range, self.base_size = crop_size, tuple(scale_range), base_size
        self.hflip, self.mean, self.std, self.ignore_index = hflip, tuple(mean), tuple(std), ignore_index

    def __call__(self, image: Image.Image, mask: np.ndarray, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = _uniform(generator, *self.scale_range)
        short = (self.base_size or min(image.size)) * scale
        image, mask = _resize(image, mask, short_side_size(image.size, short))
        x = normalize(image, self.mean, self.std)
        y = torch.from_numpy(mask.astype(np.int64))
        crop = self.crop_size
        pad_h, pad_w = max(0, crop - y.shape[0]), max(0, crop - y.shape[1])
        if pad_h or pad_w:  # bottom / right, as mmseg pads: zeros are the mean colour after normalisation
            x = F.pad(x, (0, pad_w, 0, pad_h))
            y = F.pad(y, (0, pad_w, 0, pad_h), value=self.ignore_index)
        top = int(torch.randint(0, y.shape[0] - crop + 1, (), generator=generator))
        left = int(torch.randint(0, y.shape[1] - crop + 1, (), generator=generator))
        x, y = x[:, top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]
        if float(torch.rand((), generator=generator)) < self.hflip:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()


class SegEvalTransform:
    """(RGB image, mask) -> image (3, H', W') float (short side ``base_size`` if set) and the mask (H, W) int64 at
    its original size: predictions are resized back to it before they are scored."""

    def __init__(self, base_size: int | None, mean: Sequence[float], std: Sequence[float]) -> None:
        self.base_size, self.mean, self.std = base_size, tuple(mean), tuple(std)

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.base_size is not None:
            image = image.resize(short_side_size(image.size, self.base_size), Image.BILINEAR)
        return normalize(image, self.mean, self.std), torch.from_numpy(mask.astype(np.int64))
