"""Token pooling of final-norm backbone tokens: the SSL "[CLS]" (DINO head, KoLeo, k-NN) of every backbone.

Token layout (the backbone contract, see :class:`TokenLayout`): ``forward_features`` returns the final-norm
sequence (B, L, d) = ``num_prefix_tokens`` prefix tokens (a timm ViT's [CLS] and registers; ViL: none), then the
S patch tokens row-major (top-left first). A ViL built with ``cls_token="middle"`` carries one more, learned token
at index S // 2 of its patch sequence (L = S + 1). Masks and iBOT targets index the S patches only.

Kinds (aliases in brackets):
  * ``bilateral_concat`` (``bilateral_flatten``): concat(first patch, last patch) -> (B, 2d)   [ViL default]
  * ``bilateral_avg``: (first + last) / 2 -> (B, d)
  * ``avg`` (``mean``, ``mean_patch``): mean over the patch tokens -> (B, d)
  * ``first`` (``first_token``), ``last`` (``last_token``), ``middle`` (``middle_patch``, ``middle_token``: patch
    S // 2) -> (B, d)
  * ``middle_cls``: the learned middle token of a ViL built with ``cls_token="middle"`` -> (B, d)
  * ``cls``: a ViT's class token (the first prefix token) -> (B, d)   [ViT default]
First = top-left patch, last = bottom-right patch (row-major order).

Without a layout (``layout=None``) the tokens are taken as given, which is the ViL layout; ``cls`` then reads token
0 and ``middle_cls`` token (L - 1) // 2 (both are where those tokens sit in a ViT / middle-token ViL sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    "middle_patch": "middle",
    "middle_cls": "middle_cls",
    "cls": "cls",
}
POOLING_KINDS = tuple(sorted(set(_ALIASES.values())))

# Config values of ``objective.pooling`` per backbone family (defaults first).
VIL_POOLINGS = ("bilateral_concat", "bilateral_avg", "avg", "middle_patch", "middle_cls", "first", "last", "middle")
VIT_POOLINGS = ("cls", "avg")


@dataclass(frozen=True)
class TokenLayout:
    """Where the non-patch tokens of a backbone's ``forward_features`` output sit."""

    num_prefix_tokens: int = 0  # leading tokens ([CLS], registers) before the patches
    middle_cls: bool = False  # one learned token inside the patch sequence, at index S // 2

    @property
    def has_class_token(self) -> bool:
        return self.num_prefix_tokens > 0


def token_layout(backbone: Any) -> TokenLayout:
    """The layout of ``backbone`` (timm's ``num_prefix_tokens``; ViL's ``cls_token_position``)."""
    return TokenLayout(num_prefix_tokens=int(getattr(backbone, "num_prefix_tokens", 0) or 0),
                       middle_cls=getattr(backbone, "cls_token_position", None) == "middle")


def canonical_pooling(kind: str) -> str:
    """Map a pooling name (ours or official) to its canonical name; raises ValueError for unknown names."""
    try:
        return _ALIASES[kind]
    except KeyError:
        raise ValueError(f"unknown pooling {kind!r}; expected one of {sorted(_ALIASES)}") from None


def pooled_dim(dim: int, kind: str) -> int:
    """Feature size of ``pool_tokens`` output for tokens of size ``dim``."""
    return 2 * dim if canonical_pooling(kind) == "bilateral_concat" else dim


def allowed_poolings(*, is_vit: bool, has_class_token: bool = True) -> tuple[str, ...]:
    """``objective.pooling`` values a backbone supports (its default first). A ViL's ``middle_cls`` builds the
    middle token; a ViT pools its class token (``cls``, if it has one) or the mean of its patch tokens."""
    if is_vit:
        return VIT_POOLINGS if has_class_token else ("avg",)
    return VIL_POOLINGS


def patch_tokens(tokens: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
    """The (B, S, d) patch tokens of a (B, L, d) sequence: prefix tokens and a middle token removed."""
    if layout is None:
        return tokens
    if layout.num_prefix_tokens:
        tokens = tokens[:, layout.num_prefix_tokens:]
    if layout.middle_cls:
        index = (tokens.shape[1] - 1) // 2
        tokens = torch.cat([tokens[:, :index], tokens[:, index + 1:]], dim=1)
    return tokens


def pool_tokens(tokens: torch.Tensor, kind: str, layout: TokenLayout | None = None) -> torch.Tensor:
    """Pool (B, L, d) tokens to (B, 2d) for ``bilateral_concat`` or (B, d) otherwise (see the module doc)."""
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, S, d), got {tuple(tokens.shape)}")
    kind = canonical_pooling(kind)
    if kind == "cls":
        if layout is not None and not layout.has_class_token:
            raise ValueError("pooling 'cls' needs a backbone with a class token (a ViT); this one has none")
        return tokens[:, 0]
    if kind == "middle_cls":
        if layout is not None and not layout.middle_cls:
            raise ValueError("pooling 'middle_cls' needs a ViL built with cls_token='middle'")
        start = layout.num_prefix_tokens if layout is not None else 0
        return tokens[:, start + (tokens.shape[1] - start - 1) // 2]
    tokens = patch_tokens(tokens, layout)
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
