"""Residual ViL sub-blocks and the v2 block pair (top-left -> bottom-right, then reversed)."""

from __future__ import annotations

import torch
from torch import nn

from ssl_vil.backbones.drop_path import ResidualDropPath
from ssl_vil.backbones.norms import ResidualLayerNorm
from ssl_vil.backbones.vil_layer import ViLLayer


class ViLBlock(nn.Module):
    """Pre-norm residual sub-block ``x + DropPath(layer(norm(x)))``. Input/output (B, S, dim).

    ``norm`` is a residual-weight LayerNorm (eps 1e-5, bias iff ``bias``); layer kwargs as in ``ViLLayer``.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, bias: bool = True, **layer_kwargs) -> None:
        super().__init__()
        self.norm = ResidualLayerNorm(dim, bias=bias, eps=1e-5)
        self.layer = ViLLayer(dim, bias=bias, **layer_kwargs)
        self.drop_path = ResidualDropPath(drop_path)

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.layer.reset_parameters()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.drop_path(x, lambda y: self.layer(self.norm(y), grid))


class ViLBlockPair(nn.Module):
    """v2 block pair: ``rowwise_from_top_left`` then ``rowwise_from_bot_right`` (flipped). (B, S, dim) -> same."""

    def __init__(self, dim: int, drop_path: float = 0.0, **block_kwargs) -> None:
        super().__init__()
        self.rowwise_from_top_left = ViLBlock(dim, drop_path=drop_path, flip=False, **block_kwargs)
        self.rowwise_from_bot_right = ViLBlock(dim, drop_path=drop_path, flip=True, **block_kwargs)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.rowwise_from_top_left(x, grid)
        return self.rowwise_from_bot_right(x, grid)
