"""Frozen-backbone features for evaluation: pooled "[CLS]" / "[AVG]" vectors and per-block-pair grids.

ViL has no class token. "[CLS]" is the model's bilateral pooling of the final-norm tokens (v2: concat of the
first and last patch token, (B, 2d)); a ViT's is its class token. "[AVG]" is the mean of the final-norm patch
tokens, (B, d). Both are taken before any classifier-side norm, i.e. what the SSL heads see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vil.backbones.pooling import TokenLayout, canonical_pooling, pool_tokens, token_layout
from ssl_vil.eval.options import FEATURE_SPECS  # noqa: F401  (defined torch-free for the CLI parser)
from ssl_vil.eval.progress import Progress
from ssl_vil.infra.dist import all_gather_object, is_distributed
from ssl_vil.infra.precision import autocast


def cls_pooling_of(model: nn.Module, info: Mapping[str, Any] | None = None) -> str:
    """Pooling that defines "[CLS]": the run's pooling from ``info``, else the model's own.

    A ViT's [CLS] is its class token; a ViL's is its bilateral concat unless the run pooled otherwise. A run
    that pooled the mean of the patches has that as its [AVG], so its [CLS] falls back to the class token (ViT) /
    the bilateral concat (ViL) rather than repeating [AVG].
    """
    has_class_token = token_layout(model).has_class_token
    kind = (info or {}).get("pooling")
    if kind is None:
        kind = "cls" if has_class_token else (getattr(model, "global_pool", None) or "bilateral_concat")
    kind = canonical_pooling(kind)
    if kind == "avg":
        return "cls" if has_class_token else "bilateral_concat"
    return kind


def trained_feature(info: Mapping[str, Any]) -> str:
    """The feature spec the run's DINO head was trained on: "avg" for a run that pooled the mean token, else "cls"
    (what the in-training k-NN monitor reads)."""
    try:
        return "avg" if canonical_pooling(str(info.get("pooling") or "")) == "avg" else "cls"
    except ValueError:  # no or an unknown pooling recorded: the backbone's own [CLS]
        return "cls"


def pooled_features(tokens: torch.Tensor, spec: str, cls_pooling: str = "bilateral_concat",
                    layout: TokenLayout | None = None) -> torch.Tensor:
    """Final-norm tokens (B, L, d) -> features (B, D) for ``spec`` in FEATURE_SPECS (not normalised).

    "cls" -> (B, 2d) for bilateral concat, else (B, d); "avg" -> (B, d), the mean of the patch tokens only (a
    ViT's class token and a ViL's middle token are left out, as ``layout`` says); "cls+avg" -> their concat.
    """
    if spec not in FEATURE_SPECS:
        raise ValueError(f"unknown feature spec {spec!r}; expected one of {FEATURE_SPECS}")
    parts = []
    if spec in ("cls", "cls+avg"):
        parts.append(pool_tokens(tokens, cls_pooling, layout))
    if spec in ("avg", "cls+avg"):
        parts.append(pool_tokens(tokens, "avg", layout))
    return torch.cat(parts, dim=1)


def block_features(
    model: nn.Module, images: torch.Tensor, n_last_blocks: int, cls_pooling: str = "bilateral_concat"
) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] of each of the last ``n_last_blocks`` blocks (ViL v2: block pairs), each after the final norm, and the
    last one's [AVG].

    Returns cls (B, n, Dc) oldest first, avg (B, d). Uses the timm ``forward_intermediates`` contract; a ViT's
    intermediates come with their prefix tokens, so its [CLS] is its class token at every depth.
    """
    depth = len(model.blocks)
    if not 1 <= n_last_blocks <= depth:
        raise ValueError(f"n_last_blocks must be in [1, {depth}] for this model, got {n_last_blocks}")
    layout = token_layout(model)
    inter = model.forward_intermediates(images, indices=n_last_blocks, norm=True, output_fmt="NLC",
                                        intermediates_only=True, return_prefix_tokens=layout.has_class_token)
    if layout.has_class_token:  # timm returns (patches (B, S, d), prefix (B, P, d)) pairs
        inter = [torch.cat([prefix, patches], dim=1) for patches, prefix in inter]
    cls = torch.stack([pool_tokens(t, cls_pooling, layout) for t in inter], dim=1)
    return cls, pool_tokens(inter[-1], "avg", layout)


@dataclass
class FeatureSet:
    """Features of this rank's share of a split: features (N, D) float32, labels (N,) int64, keys (N)."""

    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str]


@torch.no_grad()
def extract(
    batches: Iterable[Mapping[str, Any]],
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    progress: Progress | None = None,
    normalize: bool = False,
    precision: str = "auto",
) -> FeatureSet:
    """Run ``fn(images) -> (B, D)`` over batches of ``{"keys", "labels", "images"}``; results on CPU, float32.

    Runs under ``precision`` autocast (``auto``: bf16 on CUDA, the teacher's training precision; fp32 on CPU).
    Raises ValueError when a key repeats within this rank (each sample must be seen exactly once).
    """
    feats, labels, keys = [], [], []
    with autocast(precision, device):
        for batch in batches:
            images = batch["images"].to(device, non_blocking=True)
            out = fn(images).float()
            if normalize:
                out = F.normalize(out, dim=1)
            feats.append(out.cpu())
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.long).cpu())
            keys.extend(str(k) for k in batch["keys"])
            if progress is not None:
                progress.update(images.shape[0])
    if progress is not None:
        progress.close()
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"sample key {key!r} was delivered twice; every sample must be read exactly once")
        seen.add(key)
    if not feats:
        return FeatureSet(torch.empty(0, 0), torch.empty(0, dtype=torch.long), [])
    return FeatureSet(torch.cat(feats), torch.cat(labels), keys)


def check_disjoint_across_ranks(keys: list[str], split: str) -> int:
    """Raise if two ranks hold the same key; returns the global sample count (collective when distributed)."""
    if not is_distributed():
        return len(keys)
    seen: dict[str, int] = {}
    for rank, rank_keys in enumerate(all_gather_object(keys)):
        for k in rank_keys or []:
            if k in seen:
                raise ValueError(f"{split}: sample {k!r} was read by rank {seen[k]} and rank {rank}")
            seen[k] = rank
    return len(seen)
