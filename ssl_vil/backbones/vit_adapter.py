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

The ViT is built with ``dynamic_img_size=True`` (a ViT built without it is switched to that mode, which changes
nothing at its built size): the position embedding is interpolated to each input's grid, so local crops of any
size (a multiple of the patch size) run through the same model, and ``forward_intermediates`` gives feature maps
(B, d, H / p, W / p) at any such size (``feature_info`` describes them for dense prediction heads).

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
from torch.utils.checkpoint import checkpoint

VIT_PREFIX = "vit."
MASK_TOKEN_KEY = "mask_token"


def to_pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """An int or a pair as a pair of ints."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


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


def make_dynamic_img_size(vit: nn.Module) -> None:
    """Switch a timm ``VisionTransformer`` built without ``dynamic_img_size`` to that mode, in place: its patch
    embedding then keeps the (B, h, w, d) grid of any input and ``_pos_embed`` resamples the position embedding to
    it. At the built input size nothing changes (the embedding is used as it is, the same additions in the same
    order). Raises ValueError for a patch embedding other than timm's ``PatchEmbed``."""
    from timm.layers import Format, PatchEmbed

    if vit.dynamic_img_size:
        return
    embed = vit.patch_embed
    if not isinstance(embed, PatchEmbed) or not embed.flatten:
        raise ValueError(f"cannot make a ViT with a {type(embed).__name__} patch embedding accept any input size; "
                         "build it with dynamic_img_size=True")
    # The same settings timm's VisionTransformer gives its PatchEmbed for dynamic_img_size=True.
    embed.strict_img_size = False
    embed.flatten = False
    embed.output_fmt = Format.NHWC
    vit.dynamic_img_size = True


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
        # The objectives feed crops of several sizes and the dense heads any image size: one grid per input.
        make_dynamic_img_size(vit)
        self.vit = vit
        self.embed_dim = self.num_features = int(vit.embed_dim)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.has_class_token = bool(vit.has_class_token)
        self.depth = len(vit.blocks)
        self._patch_hw = to_pair(vit.patch_embed.patch_size)  # (ph, pw)
        # timm's feature description of the block outputs (maps of stride = patch size), named under ``vit.``.
        self.feature_info = [dict(num_chs=self.embed_dim, reduction=self._patch_hw[0], module=f"vit.blocks.{i}")
                             for i in range(self.depth)]
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
        """Token grid (h, w) = (H / p, W / p) for an input of spatial size ``img_size``."""
        patch = self._patch_hw
        return img_size[0] // patch[0], img_size[1] // patch[1]

    def _check_input(self, x: torch.Tensor) -> None:
        in_chans = self.vit.patch_embed.proj.in_channels
        patch = self._patch_hw
        if x.ndim != 4 or x.shape[1] != in_chans:
            raise ValueError(f"expected images of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if not getattr(self.vit.patch_embed, "dynamic_img_pad", False) and (
                height % patch[0] or width % patch[1] or height < patch[0] or width < patch[1]):
            raise ValueError(f"input {height}x{width} is not a positive multiple of the patch size "
                             f"{patch[0]}x{patch[1]}")

    # ---------------------------------------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, C, H, W) -> (B, num_prefix_tokens + S, d): patch embeddings, masked patches replaced by the
        mask token, then prefix tokens and the (interpolated) position embedding."""
        return self._embed(x, masks)[0]

    def _embed(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """``embed`` and the token grid (h, w) of this input."""
        self._check_input(x)
        vit = self.vit
        x = vit.patch_embed(x)  # (B, h, w, d): the ViT is in dynamic_img_size mode
        grid = (int(x.shape[1]), int(x.shape[2]))
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
        return vit.norm_pre(x), grid

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

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        masks: torch.Tensor | None = None,
    ) -> Any:
        """timm's ``forward_intermediates`` contract (same arguments and outputs as timm's ViT) at any input size
        (B, C, H, W) with H, W multiples of the patch size p, through ``embed`` (``masks`` as in
        ``forward_features``).

        Intermediates (the outputs of the blocks in ``indices``; ``norm``: after the final norm) hold the patch
        tokens only: (B, d, H / p, W / p) for ``output_fmt="NCHW"``, (B, S, d) for "NLC"; with
        ``return_prefix_tokens`` each is a pair (patches, prefix tokens (B, num_prefix_tokens, d)) (with
        ``output_dict``: the prefix tokens under "image_intermediates_prefix"). Returns (final-norm tokens
        (B, num_prefix_tokens + S, d), intermediates) unless ``intermediates_only`` / ``output_dict``.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.vit.blocks), indices)
        x, (height, width) = self._embed(x, masks)
        blocks = self.vit.blocks[: max_index + 1] if stop_early else self.vit.blocks
        intermediates = []
        for index, block in enumerate(blocks):
            if attn_mask is not None or is_causal:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
            elif self.vit.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if index in take_indices:
                intermediates.append(self.vit.norm(x) if norm else x)
        prefix = self.num_prefix_tokens
        prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
        intermediates = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.vit.norm(x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.vit.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's pruning (blocks after the last wanted one, optionally the final norm and the head), for
        ``timm.models._features.FeatureGetterNet``; returns the absolute indices kept."""
        take_indices = self.vit.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        self.depth = len(self.vit.blocks)
        self.feature_info = self.feature_info[: self.depth]
        return take_indices

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
