"""Token pooling of ViL final-norm tokens. ViL has no class token: "[CLS]" is the bilateral concat.

Kinds (official aliases in brackets):
  * ``bilateral_concat`` (``bilateral_flatten``): concat(first token, last token) -> (B, 2d)
  * ``bilateral_avg``: (first + last) / 2 -> (B, d)
  * ``avg`` (``mean``, ``mean_patch``): mean over all tokens -> (B, d)
  * ``first`` (``first_token``), ``last`` (``last_token``), ``middle`` (``middle_token``: token S // 2) -> (B, d)
First = top-left patch, last = bottom-right patch (row-major order).
"""

from __future__ import annotations

import torch

_ALIASES = {
    "bilateral_concat": "bilateral_concat",
    "bilateral_flatten": "bilateral_concat",
    "bilateral_avg": "bilateral_avg",
    "avg": "avg",
    "mean": "avg",
    "mean_patch": "avg",
    "first": "first",
    "first_token": "first",
    "last": "last",
    "last_token": "last",
    "middle": "middle",
    "middle_token": "middle",
}
POOLING_KINDS = tuple(sorted(set(_ALIASES.values())))


def canonical_pooling(kind: str) -> str:
    """Map a pooling name (ours or official) to its canonical name; raises ValueError for unknown names."""
    try:
        return _ALIASES[kind]
    except KeyError:
        raise ValueError(f"unknown pooling {kind!r}; expected one of {sorted(_ALIASES)}") from None


def pooled_dim(dim: int, kind: str) -> int:
    """Feature size of ``pool_tokens`` output for tokens of size ``dim``."""
    return 2 * dim if canonical_pooling(kind) == "bilateral_concat" else dim


def pool_tokens(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """Pool (B, S, d) tokens to (B, 2d) for ``bilateral_concat`` or (B, d) otherwise."""
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, S, d), got {tuple(tokens.shape)}")
    kind = canonical_pooling(kind)
    if kind == "bilateral_concat":
        return torch.cat([tokens[:, 0], tokens[:, -1]], dim=-1)
    if kind == "bilateral_avg":
        return (tokens[:, 0] + tokens[:, -1]) / 2
    if kind == "avg":
        return tokens.mean(dim=1)
    if kind == "first":
        return tokens[:, 0]
    if kind == "last":
        return tokens[:, -1]
    return tokens[:, tokens.shape[1] // 2]
