"""Any timm ``VisionTransformer`` as an SSL backbone, with DINOv2's token split and a learned iBOT mask token.

:class:`MaskedViT` is a thin adapter around a stock timm ViT (kept whole as ``.vit``, so its weights keep timm's
names under the ``vit.`` prefix). It adds what self-supervision needs and timm's ViT lacks:

  * ``mask_token`` (1, d), created only when asked for: masked patch embeddings are replaced by it *before* the
    position embedding is added and the prefix tokens are prepended, as DINOv2 does;
  * the backbone contract of this package (see :mod:`ssl_vil.backbones.pooling`): ``forward_features(x, masks)``
    returns the final-norm sequence (B, num_prefix_tokens + S, d), [CLS] first; masks are (B, S) or (B, h, w)
    over the patches only; ``num_prefix_tokens`` says where the patches start;
  * layer-wise lr decay: ``group_matcher`` (stem = mask token, [CLS]/register tokens, pos-embed, patch embed;
    one group per transformer block; the final norm joins the last block) and ``num_layers_for_decay``.

The ViT is built with ``dynamic_img_size=True``: the position embedding is interpolated to each input's grid, so
local crops of any size (a multiple of the patch size) run through the same model.

:func:`timm_state_dict` turns an adapter state dict into stock timm keys (``vit.`` stripped, mask token dropped):
the exported file loads with ``timm.create_model(name, pretrained=True, num_classes=0,
pretrained_cfg_overlay=dict(file=...))`` without this package.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

VIT_PREFIX = "vit."
MASK_TOKEN_KEY = "mask_token"


@functools.lru_cache(maxsize=64)
def vit_facts(name: str) -> dict[str, Any] | None:
    """Shape facts of the registered timm model ``name`` if it is a ``VisionTransformer`` (built on the meta
    device: no allocation, no init), else None: embed_dim, depth, num_heads, patch_size, has_class_token,
    num_prefix_tokens."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(name):
        return None
    with torch.device("meta"):
        try:
            net = timm.create_model(name, pretrained=False, num_classes=0)
        except Exception:  # noqa: BLE001 - a model that cannot be built plainly is not a supported backbone
            return None
    if not isinstance(net, VisionTransformer):
        return None
    heads = int(net.blocks[0].attn.num_heads) if len(net.blocks) and hasattr(net.blocks[0], "attn") else 1
    return {"embed_dim": int(net.embed_dim), "depth": len(net.blocks), "num_heads": heads,
            "patch_size": int(net.patch_embed.patch_size[0]), "has_class_token": bool(net.has_class_token),
            "num_prefix_tokens": int(net.num_prefix_tokens)}


def is_vit_model(name: str) -> bool:
    """Whether ``name`` is a registered timm ``VisionTransformer`` (not one of this package's ViL models)."""
    return not name.startswith(("vil_", "vil2_")) and vit_facts(name) is not None


class MaskedViT(nn.Module):
    """A timm ``VisionTransformer`` (``vit``) plus an optional learned mask token (see the module doc)."""

    def __init__(self, vit: nn.Module, *, mask_token: bool = False) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
        if not isinstance(vit.patch_drop, nn.Identity):
            raise ValueError("patch dropout drops patch tokens; the iBOT targets need all of them (patch_drop_rate=0)")
        self.vit = vit
        self.embed_dim = self.num_features = int(vit.embed_dim)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.has_class_token = bool(vit.has_class_token)
        self.depth = len(vit.blocks)
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        else:
            self.register_parameter(MASK_TOKEN_KEY, None)

    # -------------------------------------------------------------------------------------------- plumbing
    @property
    def blocks(self) -> nn.Module:
        return self.vit.blocks

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.vit, "pretrained_cfg", {}) or {}

    @property
    def head_norm(self) -> nn.Module | None:
        """The modules applied after ``forward_features`` by the classifier path (pool norm, attention pool):
        unused by the SSL objectives, which freeze them."""
        parts = [m for m in (getattr(self.vit, "fc_norm", None), getattr(self.vit, "attn_pool", None))
                 if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
        return nn.ModuleList(parts) if parts else None

    @property
    def num_layers_for_decay(self) -> int:
        """Number of layer-wise lr-decay groups: stem, one per transformer block, head."""
        return self.depth + 2

    def grid_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        patch = self.vit.patch_embed.patch_size
        return img_size[0] // patch[0], img_size[1] // patch[1]

    # ---------------------------------------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, C, H, W) -> (B, num_prefix_tokens + S, d): patch embeddings, masked patches replaced by the
        mask token, then prefix tokens and the (interpolated) position embedding."""
        vit = self.vit
        x = vit.patch_embed(x)  # (B, h, w, d) with dynamic_img_size, else (B, S, d)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks were given but the model has no mask token; build it with mask_token=True")
            if masks.dtype != torch.bool:
                raise ValueError(f"masks must be a bool tensor, got dtype {masks.dtype}")
            n_patches = x[0, ..., 0].numel()
            if masks.shape[0] != x.shape[0] or masks[0].numel() != n_patches or masks.ndim not in (2, 3):
                raise ValueError(f"masks must have shape (B, S)=({x.shape[0]}, {n_patches}) or (B, h, w), "
                                 f"got {tuple(masks.shape)}")
            x = torch.where(masks.reshape(*x.shape[:-1], 1), self.mask_token.to(x.dtype), x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, C, H, W) -> final-norm tokens (B, num_prefix_tokens + S, d), [CLS] first, then the patches
        row-major. ``masks``: optional bool (B, S) or (B, h, w) over the patches; True replaces that patch
        embedding by ``mask_token`` (before the position embedding)."""
        from timm.models import checkpoint_seq

        x = self.embed(x, masks)
        if self.vit.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = checkpoint_seq(self.vit.blocks, x)
        else:
            x = self.vit.blocks(x)
        return self.vit.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.vit.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, masks=masks))

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` of the wrapped ViT (no masking)."""
        return self.vit.forward_intermediates(x, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {VIT_PREFIX + n for n in self.vit.no_weight_decay()}
        if self.mask_token is not None:
            names.add(MASK_TOKEN_KEY)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise lr decay: the stem (mask token, prefix tokens, position and patch
        embedding, pre-norm), one group per transformer block (the final norm joins the last), then the head."""
        del coarse  # one grouping serves both
        return dict(stem=r"^mask_token$|^vit\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
                    blocks=[(r"^vit\.blocks\.(\d+)\.", None), (r"^vit\.norm\.", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.vit.reset_classifier(num_classes, global_pool)


def create_vit_backbone(name: str, *, mask_token: bool = False, **kwargs: Any) -> MaskedViT:
    """``MaskedViT`` around ``timm.create_model(name, num_classes=0, dynamic_img_size=True, **kwargs)``."""
    import timm

    kwargs.setdefault("num_classes", 0)
    kwargs.setdefault("dynamic_img_size", True)
    kwargs.setdefault("pretrained", False)
    return MaskedViT(timm.create_model(name, **kwargs), mask_token=mask_token)


def timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stock timm ViT keys from a :class:`MaskedViT` state dict: ``vit.`` removed, the mask token dropped."""
    out = {k[len(VIT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VIT_PREFIX)}
    extra = sorted(k for k in state_dict if not k.startswith(VIT_PREFIX) and k != MASK_TOKEN_KEY)
    if extra or not out:
        raise KeyError(f"not a MaskedViT state dict (unexpected keys {extra[:10]}, {len(out)} 'vit.*' keys)")
    return out


def load_vit_weights(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Load a plain timm ViT (strict) from an adapter state dict, a stock-key state dict, or a weights file
    (``.safetensors`` or a torch file holding either)."""
    if isinstance(source, Mapping):
        state_dict = dict(source)
    elif str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(str(source))
    else:
        state_dict = torch.load(str(source), map_location="cpu", weights_only=True)
    if any(k.startswith(VIT_PREFIX) for k in state_dict):
        state_dict = timm_state_dict(state_dict)
    state_dict.pop(MASK_TOKEN_KEY, None)
    target = model.vit if isinstance(model, MaskedViT) else model
    target.load_state_dict(state_dict, strict=True)
