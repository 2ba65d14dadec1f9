"""Light decoders from backbone feature maps to per-pixel class logits.

Both take the list of maps a plain (single-stride) backbone gives, ``[(B, C, h, w), ...]`` at one stride, and
return logits ``(B, num_classes, h', w')`` at the resolution of their finest level; the segmenter upsamples them
to the input size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Strides (px) of the pyramid levels, finest first: the ViTDet / BEiT "simple feature pyramid" for plain
# backbones, which turns four maps of a stride-16 ViT into strides 4, 8, 16 and 32.
PYRAMID_STRIDES = (4, 8, 16, 32)


class LinearDecoder(nn.Module):
    """BatchNorm + 1x1 conv on the last map: the linear protocol of dense probing.

    maps[-1]: (B, C, h, w) -> logits (B, num_classes, h, w).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels[-1])
        self.classifier = nn.Conv2d(in_channels[-1], num_classes, kernel_size=1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.norm(maps[-1]))


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _resampler(channels: int, factor: float) -> nn.Module:
    """Resample a map by ``factor`` (a power of two): transposed convs up (BN + GELU between them), max-pool down."""
    steps = round(math.log2(factor))
    if 2.0 ** steps != factor:
        raise ValueError(f"pyramid resampling factors must be powers of two, got {factor}")
    if steps == 0:
        return nn.Identity()
    if steps < 0:
        return nn.MaxPool2d(kernel_size=2 ** -steps, stride=2 ** -steps, ceil_mode=True)
    layers: list[nn.Module] = []
    for i in range(steps):
        if i:
            layers += [nn.BatchNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels, 2, stride=2))
    return nn.Sequential(*layers)


class FPNDecoder(nn.Module):
    """UperNet-style head without the pyramid pooling module, for plain (single-stride) backbones.

    Structure, for n <= 4 maps of a backbone with patch stride ``reduction`` px:
      1. pyramid: map i is resampled to stride ``PYRAMID_STRIDES[i]`` (transposed convs up, max-pool down): four
         maps of a stride-16 backbone become strides 4, 8, 16, 32; a stride-4 backbone's maps are pooled instead;
      2. lateral 1x1 conv + BN + ReLU to ``dim`` channels per level;
      3. top-down path: each level adds the bilinear upsampling of the coarser one, then a 3x3 conv + BN + ReLU;
      4. fusion: all levels upsampled to the finest, concatenated, 3x3 conv + BN + ReLU, dropout, 1x1 classifier.

    maps: n x (B, C_i, h, w) -> logits (B, num_classes, h * reduction / 4, w * reduction / 4) (the finest level).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, dim: int = 256, dropout: float = 0.1,
                 reduction: int = 16) -> None:
        super().__init__()
        if not 1 <= len(in_channels) <= len(PYRAMID_STRIDES):
            raise ValueError(f"the FPN decoder takes 1 to {len(PYRAMID_STRIDES)} feature maps, got {len(in_channels)}"
                             " (model.feature_indices)")
        strides = PYRAMID_STRIDES[: len(in_channels)]
        self.resample = nn.ModuleList(_resampler(c, reduction / s) for c, s in zip(in_channels, strides))
        self.lateral = nn.ModuleList(_conv_bn_relu(c, dim, 1) for c in in_channels)
        self.smooth = nn.ModuleList(_conv_bn_relu(dim, dim, 3) for _ in in_channels)
        self.fuse = _conv_bn_relu(dim * len(in_channels), dim, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} feature maps, got {len(maps)}")
        levels = [lat(res(x)) for x, res, lat in zip(maps, self.resample, self.lateral)]
        for i in range(len(levels) - 2, -1, -1):  # coarse to fine
            levels[i] = levels[i] + F.interpolate(levels[i + 1], size=levels[i].shape[-2:], mode="bilinear",
                                                  align_corners=False)
        levels = [smooth(x) for x, smooth in zip(levels, self.smooth)]
        size = levels[0].shape[-2:]
        fused = torch.cat([levels[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                                         for x in levels[1:]], dim=1)
        return self.classifier(self.dropout(self.fuse(fused)))


def build_decoder(kind: str, in_channels: Sequence[int], num_classes: int, dim: int, reduction: int) -> nn.Module:
    """``reduction``: the backbone's patch stride in px (the maps' step between positions)."""
    if kind == "linear":
        return LinearDecoder(in_channels, num_classes)
    if kind == "fpn":
        return FPNDecoder(in_channels, num_classes, dim, reduction=reduction)
    raise ValueError(f"model.decoder must be 'linear' or 'fpn', got {kind!r}")
