"""DINOv2 (Oquab et al. 2024): DINO + iBOT masked-patch loss + KoLeo on the pre-head pooled representation.

Defaults follow the paper: loss weights 1 / 1 / 0.1; KoLeo per global view on the student's masked global
crops, summed over views. ``centering="sinkhorn_knopp"`` selects the long recipe's teacher normalisation.
"""

from __future__ import annotations

from typing import Any

from ssl_vil.objectives.self_distillation import ObjectiveConfig

NAME = "dinov2"


def default_config(**overrides: Any) -> ObjectiveConfig:
    """DINOv2 settings: weights dino 1, ibot 1, koleo 0.1."""
    return ObjectiveConfig(**{"ibot_weight": 1.0, "koleo_weight": 0.1, **overrides})


def check_config(cfg: ObjectiveConfig) -> None:
    if cfg.ibot_weight <= 0:
        raise ValueError(f"the DINOv2 objective needs ibot_weight > 0, got {cfg.ibot_weight} (use 'dino')")
