"""One ViL layer (the mLSTM mixer inside a residual sub-block), plus its block-diagonal and conv parts.

Order (spec section 3.2): [flip] -> proj_up -> split (x_m | z) -> conv(x_m) -> SiLU = c -> q, k from c,
v from x_m -> mLSTM cell -> + learnable_skip * c -> * SiLU(z) -> proj_down -> [flip back].
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vil.backbones.mlstm_cell import MLSTMCell

ConvKind = Literal["2d", "causal1d"]


class BlockDiagonalLinear(nn.Module):
    """Block-diagonal linear map: features split into NB consecutive groups of ``block_size``.

    ``weight`` [NB, block_size (out), block_size (in)], optional ``bias`` [NB * block_size].
    Input/output (..., NB * block_size).
    """

    def __init__(self, dim: int, block_size: int = 4, bias: bool = True) -> None:
        super().__init__()
        if dim % block_size:
            raise ValueError(f"dim {dim} is not divisible by block size {block_size}")
        self.num_blocks = dim // block_size
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(self.num_blocks, block_size, block_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.view(*x.shape[:-1], self.num_blocks, self.block_size)
        out = torch.einsum("...bi,boi->...bo", grouped, self.weight).reshape(x.shape)
        return out if self.bias is None else out + self.bias


class GridConv2d(nn.Conv2d):
    """Depthwise 3x3 conv over the token grid given at call time (any resolution, non-square grids).

    Input/output (B, S, C) with S = h * w row-major. Parameters ``weight`` [C, 1, 3, 3], ``bias`` [C]; being a
    Conv2d itself, it yields the official keys ``layer.conv.weight`` / ``layer.conv.bias``.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        batch, seqlen, channels = x.shape
        height, width = grid
        if height * width != seqlen:
            raise ValueError(f"token grid {height}x{width} does not match sequence length {seqlen}")
        # (B, h, w, C) permuted to NCHW is a channels-last tensor: the conv runs without layout copies.
        x = x.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return super().forward(x).permute(0, 2, 3, 1).reshape(batch, seqlen, channels)


class CausalConv1d(nn.Module):
    """Depthwise causal conv along the token sequence (left zero padding), as in the v1 ViL / xLSTM block.

    Input/output (B, S, C); parameters ``conv.weight`` [C, 1, k], ``conv.bias`` [C].
    """

    def __init__(self, channels: int, kernel_size: int = 4) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size - 1, groups=channels)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        del grid  # a 1-D causal conv only sees the sequence
        out = self.conv(x.transpose(1, 2))[..., : -(self.kernel_size - 1)]
        return out.transpose(1, 2)


class ViLLayer(nn.Module):
    """mLSTM mixer of one ViL sub-block. Input/output (B, S, dim); ``grid`` = (h, w) with h * w = S.

    Args:
        dim: model dim d; the inner dim is I = 2d, with 4 heads and 4x4 q/k/v blocks.
        flip: process the token sequence from the bottom-right (reverse order).
        conv_kind: "2d" (v2, 3x3 on the grid, keys ``conv.*``) or "causal1d" (v1, k=4, keys ``conv1d.conv.*``).
        bias: biases in proj_up / q,k,v / proj_down and in the cell's outnorm (v2: True, v1: False).
        proj_down_blocks: ``num_blocks`` of the official proj_down init std 2 / (num_blocks * sqrt(d)).
        backend, chunk_size: mLSTM backend ("parallel", "chunkwise", "auto") and chunk length.
    """

    def __init__(
        self,
        dim: int,
        flip: bool = False,
        conv_kind: ConvKind = "2d",
        bias: bool = True,
        proj_down_blocks: int = 1,
        backend: str = "auto",
        chunk_size: int = 64,
        expansion: int = 2,
        qkv_block_size: int = 4,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        inner_dim = expansion * dim
        self.dim = dim
        self.inner_dim = inner_dim
        self.flip = flip
        self.conv_kind = conv_kind
        self.proj_down_blocks = proj_down_blocks
        self.learnable_skip = nn.Parameter(torch.ones(inner_dim))
        self.proj_up = nn.Linear(dim, 2 * inner_dim, bias=bias)
        self.q_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, bias=bias)
        self.k_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, bias=bias)
        self.v_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, bias=bias)
        if conv_kind == "2d":
            self.conv = GridConv2d(inner_dim, kernel_size=3)
        elif conv_kind == "causal1d":
            self.conv1d = CausalConv1d(inner_dim, kernel_size=4)
        else:
            raise ValueError(f"conv_kind must be '2d' or 'causal1d', got {conv_kind!r}")
        self.mlstm_cell = MLSTMCell(inner_dim, num_heads=num_heads, norm_bias=bias, backend=backend,
                                    chunk_size=chunk_size)
        self.proj_down = nn.Linear(inner_dim, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # "small init" N(0, sqrt(2 / (5 d))) with d the model dim, for proj_up and the q/k/v blocks alike.
        small_std = math.sqrt(2 / (5 * self.dim))
        for linear in (self.proj_up, self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(linear.weight, mean=0.0, std=small_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.proj_down.weight, mean=0.0, std=2 / (self.proj_down_blocks * math.sqrt(self.dim)))
        if self.proj_down.bias is not None:
            nn.init.zeros_(self.proj_down.bias)
        nn.init.ones_(self.learnable_skip)
        conv = self.conv if self.conv_kind == "2d" else self.conv1d.conv
        conv.reset_parameters()  # PyTorch default conv init, as upstream
        self.mlstm_cell.reset_parameters()

    def set_backend(self, backend: str, chunk_size: int | None = None) -> None:
        self.mlstm_cell.backend = backend
        if chunk_size is not None:
            self.mlstm_cell.chunk_size = chunk_size

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.flip:
            # Reversing a row-major sequence rotates the grid by 180 degrees; the grid shape is unchanged.
            x = x.flip(dims=[1])
        # Two GEMMs on the halves of proj_up give contiguous x_mlstm and z (no strided copies downstream).
        weight_m, weight_z = self.proj_up.weight.chunk(2, dim=0)
        bias_m, bias_z = self.proj_up.bias.chunk(2) if self.proj_up.bias is not None else (None, None)
        x_mlstm, z = F.linear(x, weight_m, bias_m), F.linear(x, weight_z, bias_z)
        conv = self.conv if self.conv_kind == "2d" else self.conv1d
        conv_act = F.silu(conv(x_mlstm, grid))
        q = self.q_proj(conv_act)
        k = self.k_proj(conv_act)
        v = self.v_proj(x_mlstm)
        h = self.mlstm_cell(q, k, v)
        h = (h + self.learnable_skip * conv_act) * F.silu(z)
        out = self.proj_down(h)
        return out.flip(dims=[1]) if self.flip else out
