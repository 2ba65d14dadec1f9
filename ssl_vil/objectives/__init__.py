"""Self-distillation over a student/teacher pair of ViL networks.

DINO, iBOT and DINOv2 are one :class:`SelfDistillationObjective` with different :class:`ObjectiveConfig` loss
weights and heads (DINO: ``ibot_weight = koleo_weight = 0``; iBOT: ``koleo_weight = 0``; DINOv2: 1 / 1 / 0.1),
stated in the recipes.
"""

from __future__ import annotations

from ssl_vil.objectives.network import SSLNetwork
from ssl_vil.objectives.self_distillation import (
    CENTERING_MODES,
    ObjectiveConfig,
    SelfDistillationObjective,
    build_objective,
)

__all__ = [
    "CENTERING_MODES",
    "ObjectiveConfig",
    "SSLNetwork",
    "SelfDistillationObjective",
    "build_objective",
]
