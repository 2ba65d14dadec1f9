"""Backbone + decoder: the segmentation network, with the backbone's layer groups for layer-wise lr decay."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vil.config.errors import invalid
from ssl_vil.segment.config import SegmentConfig
from ssl_vil.segment.decoders import build_decoder

BACKBONE_PREFIX = "backbone."


class Segmenter(nn.Module):
    """``backbone.forward_intermediates`` maps at ``feature_indices`` -> ``decoder`` -> logits upsampled
    (bilinear) to the input size.

    x: (B, 3, H, W) -> logits (B, num_classes, H, W).
    """

    def __init__(self, backbone: nn.Module, decoder: nn.Module, feature_indices: list[int],
                 feature_norm: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.feature_indices = list(feature_indices)
        self.feature_norm = feature_norm

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the backbone's maps [(B, C, h, w), ...] at its runtime grid."""
        return self.backbone.forward_intermediates(x, indices=self.feature_indices, norm=self.feature_norm,
                                                   output_fmt="NCHW", intermediates_only=True, stop_early=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.feature_maps(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {BACKBONE_PREFIX + name for name in getattr(self.backbone, "no_weight_decay", set)()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's layer groups (stem, blocks) under ``backbone.``; the decoder matches none of them, so
        timm puts it in the last group, which layer decay leaves at the full lr."""
        def prefixed(pattern: str) -> str:
            return re.sub(r"\^", "^" + re.escape(BACKBONE_PREFIX), pattern)

        groups = self.backbone.group_matcher(coarse=coarse)
        out: dict[str, Any] = {}
        for key, rule in groups.items():
            if isinstance(rule, str):
                out[key] = prefixed(rule)
            else:
                out[key] = [(prefixed(pattern), ordinal) for pattern, ordinal in rule]
        return out


def probe_backbone(backbone: nn.Module, indices: list[int], img_size: int, norm: bool) -> tuple[list[int], int]:
    """One dry forward + backward of the maps at ``indices``: returns (their channels, their stride in px) and
    freezes the backbone parameters the maps never reach (the classifier side: pre-head norm, pooling-only parts;
    blocks after the last index). Those would otherwise get weight decay without gradients and make DDP wait for
    gradients that never come. Works for any timm backbone, whatever its patch size and stride."""
    was_training = backbone.training
    backbone.eval()  # reachability is the same in eval mode, and nothing stateful is updated
    param = next(backbone.parameters())
    probe = torch.zeros(2, 3, img_size, img_size, device=param.device, dtype=param.dtype)
    maps = backbone.forward_intermediates(probe, indices=indices, norm=norm, output_fmt="NCHW",
                                          intermediates_only=True, stop_early=True)
    backbone.zero_grad(set_to_none=True)
    sum(m.sum() for m in maps).backward()
    for p in backbone.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    backbone.train(was_training)
    # Stride = the step between map positions: (img - patch) / (grid - 1) for overlapping patches too.
    grid = int(maps[0].shape[-1])
    patch = getattr(backbone, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    stride = round((img_size - patch) / (grid - 1)) if patch and grid > 1 else round(img_size / grid)
    return [int(m.shape[1]) for m in maps], stride


def build_segmenter(cfg: SegmentConfig, num_classes: int) -> tuple[Segmenter, dict[str, Any]]:
    """The backbone from ``cfg.model`` (pretrained weights or random init, built at the training crop size) with
    a fresh decoder. Returns (segmenter, info) with info = model.json-style facts of the backbone."""
    from ssl_vil.backbones.vit_adapter import is_vit_model, make_dynamic_img_size
    from ssl_vil.eval.finetune_setup import create_model_from

    m, crop = cfg.model, cfg.data.crop_size
    if m.weights is None and m.name is None:
        raise ValueError("model.name is required without model.weights")
    backbone, info = create_model_from(m.weights, m.name, m.kwargs, num_classes=0, drop_path_rate=m.drop_path_rate,
                                       img_size=crop)
    if is_vit_model(info["model"]):  # a timm ViT maps any input size to its runtime grid only in this mode
        make_dynamic_img_size(backbone)
    if m.mlstm_backend is not None and hasattr(backbone, "set_mlstm_backend"):
        backbone.set_mlstm_backend(m.mlstm_backend)
    if not hasattr(backbone, "forward_intermediates"):
        raise ValueError(f"model {info['model']!r} has no forward_intermediates: it cannot give feature maps")
    num_blocks = len(getattr(backbone, "blocks", ()))
    if num_blocks and not all(-num_blocks <= i < num_blocks for i in m.feature_indices):
        raise invalid("model.feature_indices", m.feature_indices,
                      f"block indices in [-{num_blocks}, {num_blocks - 1}]: {info['model']} has {num_blocks} "
                      "entries in .blocks" + (" (ViL2: block pairs)" if info["model"].startswith("vil2_") else ""))
    channels, stride = probe_backbone(backbone, m.feature_indices, crop, m.feature_norm)
    decoder = build_decoder(m.decoder, channels, num_classes, m.decoder_dim, stride)
    return Segmenter(backbone, decoder, m.feature_indices, m.feature_norm), info
