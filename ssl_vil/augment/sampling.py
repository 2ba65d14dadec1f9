"""Random draws from an explicit ``torch.Generator`` (augmentations never touch global RNG state).

The data stream seeds one generator per sample from (seed, epoch, key), so the augmentation of a sample is
a pure function of that triple, independent of worker count and process.
"""

from __future__ import annotations

import math

import torch


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One draw from U(low, high)."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return low + (high - low) * u


def bernoulli(generator: torch.Generator, p: float) -> bool:
    """True with probability p (always consumes one draw, so the stream layout does not depend on p)."""
    return torch.rand((), generator=generator, dtype=torch.float64).item() < p


def randint(generator: torch.Generator, low: int, high_inclusive: int) -> int:
    """One integer draw from {low, ..., high_inclusive}."""
    return int(torch.randint(low, high_inclusive + 1, (), generator=generator).item())


def random_resized_crop_box(
    generator: torch.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    max_attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Crop box (top, left, h, w) of area U(scale)·H·W and aspect log-U(ratio), as RandomResizedCrop.

    Falls back to the largest centred box with an aspect ratio inside ``ratio`` after ``max_attempts``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(max_attempts):
        target_area = area * uniform(generator, *scale)
        aspect = math.exp(uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = randint(generator, 0, height - h)
            left = randint(generator, 0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
