"""One ViL layer (the mLSTM mixer inside a residual sub-block), plus its block-diagonal and conv parts.

Order (spec section 3.2): [flip] -> proj_up -> split (x_m | z) -> conv(x_m) -> SiLU = c -> q, k from c,
v from x_m -> mLSTM cell -> + learnable_skip * c -> * SiLU(z) -> proj_down -> [flip back].

A layer of several traversal directions (block designs ``bi`` / ``quad``, see :mod:`ssl_vil.backbones.designs`)
computes proj_up and proj_down once and, per direction, the "mLSTM branch" (conv -> SiLU -> q, k, v -> cell ->
+ skip) on x_m permuted into that direction's order; the branches are permuted back, summed and gated by SiLU(z).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vil.backbones.designs import TRAVERSALS, Traversal
from ssl_vil.backbones.mlstm_cell import MLSTMCell

ConvKind = Literal["2d", "causal1d"]


def to_traversal(x: torch.Tensor, grid: tuple[int, int], direction: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens (B, S, C) in row-major order of the (h, w) grid -> the same tokens in ``direction``'s order, and the
    grid as that order sees it ((h, w) for rows, (w, h) for columns: the row-major order of the transposed grid).

    Reversing a row-major sequence rotates the grid by 180 degrees, so a reversed traversal keeps its grid shape.
    """
    if direction == "row_fwd":
        return x, grid
    if direction == "row_bwd":
        return x.flip(dims=[1]), grid
    batch, seqlen, channels = x.shape
    height, width = grid
    if height * width != seqlen:
        raise ValueError(f"token grid {height}x{width} does not match sequence length {seqlen}")
    columns = x.reshape(batch, height, width, channels).transpose(1, 2).reshape(batch, seqlen, channels)
    if direction == "col_fwd":
        return columns, (width, height)
    if direction == "col_bwd":
        return columns.flip(dims=[1]), (width, height)
    raise ValueError(f"traversal direction must be one of {TRAVERSALS}, got {direction!r}")


def from_traversal(y: torch.Tensor, grid: tuple[int, int], direction: str) -> torch.Tensor:
    """Inverse of :func:`to_traversal`: (B, S, C) in ``direction``'s order -> row-major order of the (h, w) grid."""
    if direction == "row_fwd":
        return y
    if direction == "row_bwd":
        return y.flip(dims=[1])
    if direction not in ("col_fwd", "col_bwd"):
        raise ValueError(f"traversal direction must be one of {TRAVERSALS}, got {direction!r}")
    if direction == "col_bwd":
        y = y.flip(dims=[1])
    batch, seqlen, channels = y.shape
    height, width = grid
    return y.reshape(batch, width, height, channels).transpose(1, 2).reshape(batch, seqlen, channels)


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
        if seqlen == height * width + 1 and height * width % 2 == 0:
            # A ViL with a middle [CLS] token (cls_token="middle"): it sits at index S // 2 of the S patches, the
            # centre of the sequence in either row direction; the conv sees it as an isolated pixel (centre tap).
            index = seqlen // 2
            out = self.forward(torch.cat([x[:, :index], x[:, index + 1:]], dim=1), grid)
            centre = self.weight[:, 0, self.kernel_size[0] // 2, self.kernel_size[1] // 2]
            token = x[:, index:index + 1] * centre + (self.bias if self.bias is not None else 0)
            return torch.cat([out[:, :index], token, out[:, index:]], dim=1)
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


def _small_init_(linear: nn.Module, dim: int) -> None:
    """The official "small init" N(0, sqrt(2 / (5 d))), d the model dim, of proj_up and the q/k/v blocks."""
    nn.init.normal_(linear.weight, mean=0.0, std=math.sqrt(2 / (5 * dim)))
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _branch_forward(parts: nn.Module, x_mlstm: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The mLSTM branch of one traversal direction: (B, S, I) in traversal order -> (B, S, I), before the z gate.

    ``parts`` holds ``conv`` (or ``conv1d``), ``q_proj``, ``k_proj``, ``v_proj``, ``mlstm_cell``, ``learnable_skip``
    (a :class:`ViLLayer` for its first direction, an :class:`MLSTMBranch` for another); ``grid`` is the grid as the
    traversal sees it.
    """
    conv = parts.conv if parts.conv_kind == "2d" else parts.conv1d
    conv_act = F.silu(conv(x_mlstm, grid))
    q = parts.q_proj(conv_act)
    k = parts.k_proj(conv_act)
    v = parts.v_proj(x_mlstm)
    h = parts.mlstm_cell(q, k, v)
    return h + parts.learnable_skip * conv_act


class MLSTMBranch(nn.Module):
    """The parameters of one extra traversal direction of a multi-direction :class:`ViLLayer` (separate parameters):
    ``conv`` (2d) / ``conv1d`` (causal1d), ``q_proj`` / ``k_proj`` / ``v_proj`` (4x4 blocks), ``mlstm_cell``,
    ``learnable_skip`` [I]; initialised like the layer's own (first-direction) ones."""

    def __init__(self, dim: int, inner_dim: int, conv_kind: ConvKind, bias: bool, backend: str, chunk_size: int,
                 qkv_block_size: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.conv_kind = conv_kind
        self.learnable_skip = nn.Parameter(torch.ones(inner_dim))
        self.q_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, bias=bias)
        self.k_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, bias=bias)
        self.v_proj = BlockDiagonalLinear(inner_dim, qkv_block_size, bias=bias)
        if conv_kind == "2d":
            self.conv = GridConv2d(inner_dim, kernel_size=3)
        else:
            self.conv1d = CausalConv1d(inner_dim, kernel_size=4)
        self.mlstm_cell = MLSTMCell(inner_dim, num_heads=num_heads, norm_bias=bias, backend=backend,
                                    chunk_size=chunk_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj):
            _small_init_(linear, self.dim)
        nn.init.ones_(self.learnable_skip)
        (self.conv if self.conv_kind == "2d" else self.conv1d.conv).reset_parameters()
        self.mlstm_cell.reset_parameters()


class ViLLayer(nn.Module):
    """mLSTM mixer of one ViL sub-block. Input/output (B, S, dim); ``grid`` = (h, w) with h * w = S.

    Args:
        dim: model dim d; the inner dim is I = 2d, with 4 heads and 4x4 q/k/v blocks.
        flip: process the token sequence from the bottom-right (reverse order); the same as
            ``directions=("row_bwd",)``.
        conv_kind: "2d" (v2, 3x3 on the grid, keys ``conv.*``) or "causal1d" (v1, k=4, keys ``conv1d.conv.*``).
        bias: biases in proj_up / q,k,v / proj_down and in the cell's outnorm (v2: True, v1: False).
        proj_down_blocks: ``num_blocks`` of the official proj_down init std 2 / (num_blocks * sqrt(d)).
        backend, chunk_size: mLSTM backend ("parallel", "chunkwise", "mlstm_kernels", "auto") and chunk length.
        directions: the traversals of the grid (``"row_fwd"``, ``"row_bwd"``, ``"col_fwd"``, ``"col_bwd"``), their
            branch outputs summed; None: ``("row_bwd",)`` if ``flip`` else ``("row_fwd",)``. The first direction
            uses the layer's own branch parameters (the official key names).
        share_directions: every direction uses the first one's branch parameters; else each further direction
            has its own, in ``branches.<direction>.*``.
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
        directions: tuple[Traversal, ...] | None = None,
        share_directions: bool = False,
    ) -> None:
        super().__init__()
        if directions is None:
            directions = ("row_bwd",) if flip else ("row_fwd",)
        elif flip:
            raise ValueError("give either flip=True or directions, not both")
        directions = tuple(directions)
        if not directions or len(set(directions)) != len(directions) or not set(directions) <= set(TRAVERSALS):
            raise ValueError(f"directions must be distinct values of {TRAVERSALS}, got {directions!r}")
        if conv_kind == "causal1d" and any(d.startswith("col") for d in directions):
            # A causal 1-D conv over a column-major sequence would need the v1 layout's flat token order.
            raise ValueError("column traversals need conv_kind='2d'")
        inner_dim = expansion * dim
        self.dim = dim
        self.inner_dim = inner_dim
        self.directions: tuple[Traversal, ...] = directions
        self.share_directions = share_directions
        self.flip = directions == ("row_bwd",)
        self.conv_kind = conv_kind
        self.proj_down_blocks = proj_down_blocks
        # Creation order (and so the RNG draws of the default init) is that of the single-direction layer.
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
        # Empty (no state-dict keys) for a single direction or shared parameters.
        self.branches = nn.ModuleDict()
        if not share_directions:
            for direction in directions[1:]:
                self.branches[direction] = MLSTMBranch(dim, inner_dim, conv_kind, bias, backend, chunk_size,
                                                       qkv_block_size, num_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # "small init" N(0, sqrt(2 / (5 d))) with d the model dim, for proj_up and the q/k/v blocks alike.
        for linear in (self.proj_up, self.q_proj, self.k_proj, self.v_proj):
            _small_init_(linear, self.dim)
        nn.init.normal_(self.proj_down.weight, mean=0.0, std=2 / (self.proj_down_blocks * math.sqrt(self.dim)))
        if self.proj_down.bias is not None:
            nn.init.zeros_(self.proj_down.bias)
        nn.init.ones_(self.learnable_skip)
        conv = self.conv if self.conv_kind == "2d" else self.conv1d.conv
        conv.reset_parameters()  # PyTorch default conv init, as upstream
        self.mlstm_cell.reset_parameters()
        for branch in self.branches.values():
            branch.reset_parameters()

    def set_backend(self, backend: str, chunk_size: int | None = None) -> None:
        for cell in self.modules():
            if isinstance(cell, MLSTMCell):
                cell.backend = backend
                if chunk_size is not None:
                    cell.chunk_size = chunk_size

    def branch_parts(self, direction: str) -> nn.Module:
        """The module holding ``direction``'s branch parameters (the layer itself for the first direction and
        whenever directions share parameters)."""
        if direction not in self.directions:
            raise KeyError(f"{direction!r} is not a direction of this layer ({self.directions})")
        return self if self.share_directions or direction == self.directions[0] else self.branches[direction]

    def _split_proj_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Two GEMMs on the halves of proj_up give contiguous x_mlstm and z (no strided copies downstream).
        weight_m, weight_z = self.proj_up.weight.chunk(2, dim=0)
        bias_m, bias_z = self.proj_up.bias.chunk(2) if self.proj_up.bias is not None else (None, None)
        return F.linear(x, weight_m, bias_m), F.linear(x, weight_z, bias_z)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if len(self.directions) == 1:
            # One direction: permute the input and un-permute the output, the official single-direction order of
            # operations (alternating models stay bit-identical to the released ones).
            direction = self.directions[0]
            x, seq_grid = to_traversal(x, grid, direction)
            x_mlstm, z = self._split_proj_up(x)
            h = _branch_forward(self, x_mlstm, seq_grid) * F.silu(z)
            return from_traversal(self.proj_down(h), grid, direction)
        # Several directions: proj_up / z / proj_down are per token, so they run once in row-major order; only the
        # branches see their direction's order. The official layer gates each branch by its permuted z and then
        # sums; summing first and gating once is the same function.
        x_mlstm, z = self._split_proj_up(x)
        total: torch.Tensor | None = None
        for direction in self.directions:
            permuted, seq_grid = to_traversal(x_mlstm, grid, direction)
            branch = from_traversal(_branch_forward(self.branch_parts(direction), permuted, seq_grid), grid,
                                    direction)
            total = branch if total is None else total + branch
        assert total is not None
        return self.proj_down(total * F.silu(z))
