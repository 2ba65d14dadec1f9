"""Residual ViL sub-blocks and the v2 block pair (alternating design: top-left -> bottom-right, then reversed;
other block designs: see :mod:`ssl_vil.backbones.designs`)."""

from __future__ import annotations

import torch
from torch import nn

from ssl_vil.backbones.designs import DEFAULT_BLOCK_DESIGN, pair_layout
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
    """v2 block pair: two residual sub-blocks, (B, S, dim) -> same.

    ``design="alternating"`` (official): ``rowwise_from_top_left`` then ``rowwise_from_bot_right`` (flipped). Other
    designs (:func:`ssl_vil.backbones.designs.pair_layout`): ``first`` then ``second``, both making the design's
    traversals. ``block_kwargs`` go to both :class:`ViLBlock` (and on to ``ViLLayer``).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, design: str = DEFAULT_BLOCK_DESIGN, **block_kwargs) -> None:
        super().__init__()
        self.design = design
        names: list[str] = []
        for sub in pair_layout(design):
            self.add_module(sub.name, ViLBlock(dim, drop_path=drop_path, directions=sub.directions,
                                               share_directions=sub.share_directions, **block_kwargs))
            names.append(sub.name)
        self.sub_block_names: tuple[str, ...] = tuple(names)

    @property
    def sub_blocks(self) -> tuple[ViLBlock, ViLBlock]:
        """The two sub-blocks in the order they run."""
        first, second = (getattr(self, name) for name in self.sub_block_names)
        return first, second

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        first, second = self.sub_blocks
        return second(first(x, grid), grid)
