"""Backbone + projection heads: the module that the student and the teacher each are one instance of."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_vil.backbones.pooling import patch_tokens, pool_tokens, token_layout
from ssl_vil.heads import DINOHead


class SSLNetwork(nn.Module):
    """Backbone with a DINO head on the pooled representation and an iBOT head on patch tokens.

    The backbone follows the contract of :mod:`ssl_vil.backbones.pooling`: ``forward_features(x, masks=...)``
    returns final-norm tokens (B, L, d) whose layout (``num_prefix_tokens``, a ViL middle token) says which are
    patches. A ViT's [CLS] (pooling ``cls``) or a ViL pooling feeds the DINO head and KoLeo; the patch tokens
    alone (no prefix or middle token) feed the iBOT head, indexed like the masks.

    ``ibot_head`` is None when the patch loss is off or when the DINO head is shared with it
    (``share_head=True``); then :attr:`patch_head` returns the DINO head.

    This is the module a trainer wraps in DistributedDataParallel: one forward call produces every
    student output the losses need.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dino_head: DINOHead,
        ibot_head: DINOHead | None,
        *,
        pooling: str,
        share_head: bool = False,
    ) -> None:
        super().__init__()
        if share_head and ibot_head is not None:
            raise ValueError("share_head=True needs ibot_head=None (the DINO head serves both losses)")
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.pooling = pooling
        self.share_head = share_head
        self.layout = token_layout(backbone)

    @property
    def patch_head(self) -> DINOHead | None:
        return self.dino_head if self.share_head else self.ibot_head

    def forward(
        self,
        global_crops: Tensor,
        local_crops: Tensor | None = None,
        masks: Tensor | None = None,
        mask_indices: Tensor | None = None,
    ) -> dict[str, Tensor | None]:
        """Run crops through backbone and heads.

        Args:
            global_crops: (n_global * B, 3, H, W).
            local_crops: (n_local * B, 3, h, w) or None (local crops are a separate forward: the recurrent
                backbone cannot pack sequences of different length into one call).
            masks: (n_global * B, S) bool or None; True patches are replaced by the backbone's mask token.
            mask_indices: (M,) int64 flat indices into the (n_global * B * S) global tokens whose patch
                logits are wanted, or None.

        Returns:
            global_pooled: (n_global * B, P) pooled representation before the head (KoLeo input).
            global_logits: (n_global * B, K) DINO head outputs.
            local_logits: (n_local * B, K) or None.
            patch_logits: (M, K_patch) patch-head outputs at ``mask_indices``, or None.
        """
        tokens = self.backbone.forward_features(global_crops, masks=masks)
        global_pooled = pool_tokens(tokens, self.pooling, self.layout)
        global_logits = self.dino_head(global_pooled)
        local_logits = None
        if local_crops is not None:
            local_tokens = self.backbone.forward_features(local_crops)
            local_logits = self.dino_head(pool_tokens(local_tokens, self.pooling, self.layout))
        patch_logits = None
        if mask_indices is not None:
            head = self.patch_head
            if head is None:
                raise ValueError("mask_indices were given but the network has no patch head")
            patches = patch_tokens(tokens, self.layout)
            patch_logits = head(torch.index_select(patches.flatten(0, 1), 0, mask_indices))
        return {
            "global_pooled": global_pooled,
            "global_logits": global_logits,
            "local_logits": local_logits,
            "patch_logits": patch_logits,
        }
