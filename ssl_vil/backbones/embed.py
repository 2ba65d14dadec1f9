"""Patch embedding and the 2-D learned position embedding (resized to the runtime token grid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def to_2tuple(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value!r}")
    return (int(value[0]), int(value[1]))


def resize_pos_embed(embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (align_corners=False, no antialias, dtype kept) of a (1, H, W, d) embedding to (1, h, w, d)."""
    if tuple(embed.shape[1:3]) == tuple(grid):
        return embed
    resized = F.interpolate(embed.permute(0, 3, 1, 2), size=tuple(grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Conv patchify: (B, C, H, W) -> (B, h, w, d) channels-last with h = (H - p) // stride + 1.

    ``proj`` = Conv2d(C, d, kernel p, stride ``stride`` (default p), bias); init xavier-uniform on the
    weight viewed as (d, C * p * p), bias 0.
    """

    def __init__(self, dim: int, patch_size: int, in_chans: int = 3, stride: int | None = None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.stride = stride or patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=self.stride)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        weight = self.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def grid_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        height, width = img_size
        if height < self.patch_size or width < self.patch_size:
            raise ValueError(f"input {height}x{width} is smaller than the patch size {self.patch_size}")
        return ((height - self.patch_size) // self.stride + 1, (width - self.patch_size) // self.stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class PosEmbed2d(nn.Module):
    """Learned absolute position embedding ``embed`` [1, Gh, Gw, d], added to (B, h, w, d) tokens.

    If the runtime grid (h, w) differs from (Gh, Gw) the embedding is bicubically resized on the fly.
    Init: truncated normal, std 0.02.
    """

    def __init__(self, grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, grid[0], grid[1], dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + resize_pos_embed(self.embed, (x.shape[1], x.shape[2]))
