"""Whether one head may serve both the image-level (DINO) and the patch-level (iBOT) loss."""

from __future__ import annotations


def check_head_sharing(pooled_dim: int, patch_dim: int, shared: bool) -> None:
    """Raise ``ValueError`` when a shared DINO/iBOT head is requested but the input widths differ.

    The DINO head sees the pooled representation (e.g. bilateral concat: 2·d), the iBOT head sees patch
    tokens (d); one head can only serve both when the two widths agree.
    """
    if shared and pooled_dim != patch_dim:
        raise ValueError(
            f"a shared DINO/iBOT head needs equal input widths, but the pooled representation has "
            f"{pooled_dim} features and the patch tokens have {patch_dim}; use separate heads "
            f"(shared_head=False) or a pooling whose width equals the token width "
            f"('bilateral_avg' or 'avg' instead of 'bilateral_concat')"
        )
