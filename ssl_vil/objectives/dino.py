"""DINO (Caron et al. 2021): cross-view distillation of the pooled representation only.

No masking, no patch head, no KoLeo.
"""

from __future__ import annotations

from typing import Any

from ssl_vil.objectives.self_distillation import ObjectiveConfig

NAME = "dino"


def default_config(**overrides: Any) -> ObjectiveConfig:
    """DINO settings: image-level loss only (``ibot_weight = koleo_weight = 0``)."""
    return ObjectiveConfig(**{"ibot_weight": 0.0, "koleo_weight": 0.0, **overrides})


def check_config(cfg: ObjectiveConfig) -> None:
    if cfg.ibot_weight != 0 or cfg.koleo_weight != 0:
        raise ValueError(
            f"the DINO objective has no patch or KoLeo term; got ibot_weight={cfg.ibot_weight}, "
            f"koleo_weight={cfg.koleo_weight} (use 'ibot' or 'dinov2')"
        )
