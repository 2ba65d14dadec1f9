"""Self-distillation losses: tensors in, tensors out; state (centers) is owned by the caller."""

from ssl_vil.losses.centering import EMACenter, centered_teacher_probs
from ssl_vil.losses.dino import dino_cross_entropy
from ssl_vil.losses.ibot import ibot_patch_loss
from ssl_vil.losses.koleo import koleo_loss
from ssl_vil.losses.sinkhorn import sinkhorn_knopp

__all__ = [
    "EMACenter",
    "centered_teacher_probs",
    "dino_cross_entropy",
    "ibot_patch_loss",
    "koleo_loss",
    "sinkhorn_knopp",
]
