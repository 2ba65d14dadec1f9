"""The mLSTM cell module of a ViL layer: gates, backend dispatch and the per-head output norm."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ssl_vil.backbones.chunkwise_form import mlstm_chunkwise
from ssl_vil.backbones.kernels_form import kernels_available, mlstm_kernels_form
from ssl_vil.backbones.parallel_form import mlstm_parallel
from ssl_vil.backbones.norms import MultiHeadLayerNorm

MLSTMBackend = Literal["parallel", "chunkwise", "mlstm_kernels", "auto"]
# "mlstm_kernels" needs the optional package mlstm-kernels (NXAI Community Licence; ssl_vil.backbones.kernels_form).
MLSTM_BACKENDS = ("parallel", "chunkwise", "mlstm_kernels", "auto")
# Up to this many tokens the quadratic form is at least as fast as the chunkwise one (bench/backbone.py).
AUTO_PARALLEL_MAX_TOKENS = 256
MLSTM_EPS = 1e-6


def check_backend(backend: str) -> str:
    if backend not in MLSTM_BACKENDS:
        raise ValueError(f"mlstm_backend must be one of {MLSTM_BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, seqlen: int, device: torch.device | str) -> str:
    """The concrete backend ``backend`` runs as for ``seqlen`` tokens on ``device``.

    ``auto``: "parallel" up to AUTO_PARALLEL_MAX_TOKENS tokens; beyond, "mlstm_kernels" on CUDA when that package
    (and triton) imports, else "chunkwise". Other names are returned as they are (after the name check).
    """
    check_backend(backend)
    if backend != "auto":
        return backend
    if seqlen <= AUTO_PARALLEL_MAX_TOKENS:
        return "parallel"
    if torch.device(device).type == "cuda" and kernels_available("cuda"):
        return "mlstm_kernels"
    return "chunkwise"


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate_preact: torch.Tensor,
    fgate_preact: torch.Tensor,
    backend: str = "auto",
    chunk_size: int = 64,
) -> torch.Tensor:
    """Run the mLSTM with the named backend (``auto``: see ``resolve_backend``). Shapes as in ``mlstm_parallel``:
    (B, NH, S, DH) -> (B, NH, S, DHV)."""
    backend = resolve_backend(backend, q.shape[-2], q.device)
    if backend == "parallel":
        return mlstm_parallel(q, k, v, igate_preact, fgate_preact, eps=MLSTM_EPS)
    if backend == "mlstm_kernels":
        return mlstm_kernels_form(q, k, v, igate_preact, fgate_preact, eps=MLSTM_EPS, chunk_size=chunk_size)
    return mlstm_chunkwise(q, k, v, igate_preact, fgate_preact, eps=MLSTM_EPS, chunk_size=chunk_size)


class MLSTMCell(nn.Module):
    """mLSTM cell: input/forget gates from concat(q, k, v), the mLSTM, then a per-head LayerNorm.

    Input q, k, v: (B, S, I) with heads as contiguous DH = I / NH feature slices; output (B, S, I).
    Parameters: ``igate``/``fgate`` Linear(3I -> NH), ``outnorm`` (per-head LN, scale 1 + w).
    """

    def __init__(
        self,
        inner_dim: int,
        num_heads: int = 4,
        norm_bias: bool = True,
        backend: str = "auto",
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        if inner_dim % num_heads:
            raise ValueError(f"inner dim {inner_dim} is not divisible by num_heads={num_heads}")
        self.inner_dim = inner_dim
        self.num_heads = num_heads
        self.backend = check_backend(backend)
        self.chunk_size = chunk_size
        self.igate = nn.Linear(3 * inner_dim, num_heads)
        self.fgate = nn.Linear(3 * inner_dim, num_heads)
        self.outnorm = MultiHeadLayerNorm(num_heads, inner_dim, bias=norm_bias, eps=1e-5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Input gate starts near exp(0) = 1 with a little spread; forget gates start open (sigmoid(3..6)).
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        self.outnorm.reset_parameters()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, seqlen, _ = q.shape
        gate_input = torch.cat([q, k, v], dim=-1)
        igate_preact = self.igate(gate_input).transpose(1, 2)  # (B, NH, S)
        fgate_preact = self.fgate(gate_input).transpose(1, 2)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seqlen, self.num_heads, -1).transpose(1, 2)

        h = mlstm(heads(q), heads(k), heads(v), igate_preact, fgate_preact, self.backend, self.chunk_size)
        return self.outnorm(h)
