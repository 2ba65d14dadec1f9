"""Projection heads for self-distillation objectives."""

from ssl_vil.heads.dino_head import LAST_LAYER_NAME, DINOHead, DINOHeadConfig
from ssl_vil.heads.sharing import check_head_sharing

__all__ = ["LAST_LAYER_NAME", "DINOHead", "DINOHeadConfig", "check_head_sharing"]
