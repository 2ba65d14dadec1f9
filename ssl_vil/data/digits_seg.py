"""``builtin:digits-seg``: a small, deterministic semantic-segmentation set made of scikit-learn digits.

Each sample is a 128x128 RGB canvas (gray replicated, black background) cut into a 4x4 grid of 32x32 cells.
A canvas draws k in [3, 6] distinct cells; each chosen cell gets one digit of the digits split of the same name
(:func:`ssl_vil.data.sources.digits_split_indices`, so train and val canvases never share a digit instance),
resized bilinearly (8x8 values / 16, ``align_corners=False``, like :func:`~ssl_vil.data.sources.digits_png_bytes`)
to a side s in [20, 32] px and placed at a random offset inside its cell, so digits never overlap. The mask
(mode ``L``) is 0 on the background and d + 1 on the pixels of digit d whose intensity is >= 64 of 255: 11
classes, :data:`DIGITS_SEG_CLASSES`.

Every random draw comes from one ``torch.Generator`` per split seeded with :func:`~ssl_vil.data.seeding.
stable_seed`, so two generations are equal byte for byte on every machine.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DIGITS_SEG_SPEC = "builtin:digits-seg"
DIGITS_SEG_CLASSES: tuple[str, ...] = ("background", *(str(d) for d in range(10)))
DIGITS_SEG_SIZES = {"train": 1000, "val": 200}
CANVAS = 128
CELL = 32
GRID = CANVAS // CELL
MIN_DIGITS, MAX_DIGITS = 3, 6
MIN_SIDE, MAX_SIDE = 20, 32
# Digit pixels at least this bright (of 255) are labelled; the faint bilinear fringe stays background.
MASK_THRESHOLD = 64


@dataclass(frozen=True, slots=True)
class DigitPlacement:
    """One digit on a canvas: its original scikit-learn index and class, and the square it covers."""

    digit: int  # index into load_digits()
    label: int  # 0-9; mask value label + 1
    cell: int  # 0-15, row-major in the 4x4 grid
    side: int  # pixels
    top: int  # canvas row of the square's first pixel
    left: int  # canvas column of the square's first pixel


def _check_split(split: str) -> None:
    from ssl_vil.data.errors import DataConfigError

    if split not in DIGITS_SEG_SIZES:
        raise DataConfigError(f"{DIGITS_SEG_SPEC} has splits 'train' and 'val', not {split!r}")


@functools.lru_cache(maxsize=2)
def digits_seg_layout(split: str) -> tuple[tuple[DigitPlacement, ...], ...]:
    """The placements of every canvas of ``split``, in canvas order."""
    import torch
    from sklearn.datasets import load_digits

    from ssl_vil.data.seeding import make_generator, stable_seed
    from ssl_vil.data.sources import digits_split_indices

    _check_split(split)
    count = DIGITS_SEG_SIZES[split]
    pool = torch.tensor(digits_split_indices(split))
    targets = load_digits().target
    g = make_generator(stable_seed(DIGITS_SEG_SPEC, split))
    # All draws at once, in a fixed order; a canvas with k digits uses the first k of its MAX_DIGITS slots.
    ks = torch.randint(MIN_DIGITS, MAX_DIGITS + 1, (count,), generator=g)
    cells = torch.rand(count, GRID * GRID, generator=g).argsort(dim=1, stable=True)[:, :MAX_DIGITS]
    digits = pool[torch.randint(0, len(pool), (count, MAX_DIGITS), generator=g)]
    sides = torch.randint(MIN_SIDE, MAX_SIDE + 1, (count, MAX_DIGITS), generator=g)
    # Offset in [0, CELL - side]: floor of a uniform draw scaled by the number of positions.
    offsets = (torch.rand(count, MAX_DIGITS, 2, generator=g) * (CELL - sides + 1).unsqueeze(-1)).floor().long()
    layout = []
    for n in range(count):
        placements = []
        for slot in range(int(ks[n])):
            cell, digit, side = int(cells[n, slot]), int(digits[n, slot]), int(sides[n, slot])
            top = (cell // GRID) * CELL + int(offsets[n, slot, 0])
            left = (cell % GRID) * CELL + int(offsets[n, slot, 1])
            placements.append(DigitPlacement(digit, int(targets[digit]), cell, side, top, left))
        layout.append(tuple(placements))
    return tuple(layout)


def digits_seg_digits(split: str) -> list[tuple[int, ...]]:
    """The scikit-learn digit indices each canvas of ``split`` uses (to check that splits share none)."""
    return [tuple(p.digit for p in canvas) for canvas in digits_seg_layout(split)]


@functools.lru_cache(maxsize=2)
def digits_seg_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(gray canvases ``(N, 128, 128)`` uint8, masks ``(N, 128, 128)`` uint8) of ``split``."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    layout = digits_seg_layout(split)
    pixels = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    flat = [(n, p) for n, canvas in enumerate(layout) for p in canvas]
    canvases = np.zeros((len(layout), CANVAS, CANVAS), dtype=np.uint8)
    classes = np.zeros_like(canvases)
    # One interpolation per side length (13 of them) instead of one per digit.
    for side in range(MIN_SIDE, MAX_SIDE + 1):
        group = [(n, p) for n, p in flat if p.side == side]
        if not group:
            continue
        index = torch.tensor([p.digit for _, p in group])
        big = F.interpolate(pixels[index], size=(side, side), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
        squares = big.mul(255.0).round().to(torch.uint8)[:, 0].numpy()
        for (n, p), square in zip(group, squares):
            canvases[n, p.top : p.top + side, p.left : p.left + side] = square
            classes[n, p.top : p.top + side, p.left : p.left + side] = p.label + 1
    masks = np.where(canvases >= MASK_THRESHOLD, classes, 0).astype(np.uint8)
    return canvases, masks


@functools.lru_cache(maxsize=2)
def digits_seg_png_bytes(split: str) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """(RGB canvas PNGs, mode-L mask PNGs) of every canvas of ``split``, in canvas order."""
    import numpy as np
    from PIL import Image

    canvases, masks = digits_seg_arrays(split)
    images: list[bytes] = []
    labels: list[bytes] = []
    for gray, mask in zip(canvases, masks):
        for array, out in ((np.repeat(gray[:, :, None], 3, axis=2), images), (mask, labels)):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            out.append(buffer.getvalue())
    return tuple(images), tuple(labels)


def digits_seg_keys(split: str) -> list[str]:
    _check_split(split)
    return [f"dseg_{split}_{n:04d}" for n in range(DIGITS_SEG_SIZES[split])]
