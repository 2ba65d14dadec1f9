"""iBOT (Zhou et al. 2022): DINO loss on the pooled representation + masked-patch self-distillation.

The student sees block-masked global crops; the teacher's patch outputs at the masked positions are the
targets of the student's patch head. No KoLeo.
"""

from __future__ import annotations

from typing import Any

from ssl_vil.objectives.self_distillation import ObjectiveConfig

NAME = "ibot"


def default_config(**overrides: Any) -> ObjectiveConfig:
    """iBOT settings: DINO + masked-patch loss with weight 1, no KoLeo."""
    return ObjectiveConfig(**{"ibot_weight": 1.0, "koleo_weight": 0.0, **overrides})


def check_config(cfg: ObjectiveConfig) -> None:
    if cfg.ibot_weight <= 0 or cfg.koleo_weight != 0:
        raise ValueError(
            f"the iBOT objective needs ibot_weight > 0 and no KoLeo; got ibot_weight={cfg.ibot_weight}, "
            f"koleo_weight={cfg.koleo_weight} (use 'dinov2' for KoLeo)"
        )
