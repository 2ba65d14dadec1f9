"""Self-distillation objectives (DINO, iBOT, DINOv2) over a student/teacher pair of ViL networks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ssl_vil.objectives import dino, dinov2, ibot
from ssl_vil.objectives.network import SSLNetwork
from ssl_vil.objectives.self_distillation import CENTERING_MODES, ObjectiveConfig, SelfDistillationObjective

_METHODS: dict[str, tuple[Callable[..., ObjectiveConfig], Callable[[ObjectiveConfig], None]]] = {
    module.NAME: (module.default_config, module.check_config) for module in (dino, ibot, dinov2)
}
OBJECTIVES = tuple(_METHODS)


def default_config(name: str, **overrides: Any) -> ObjectiveConfig:
    """The method's default :class:`ObjectiveConfig`, with ``overrides`` applied."""
    return _method(name)[0](**overrides)


def build_objective(
    name: str, backbone: nn.Module, cfg: ObjectiveConfig | None = None, **overrides: Any
) -> SelfDistillationObjective:
    """Build the ``name`` objective ("dino", "ibot", "dinov2") around the student ``backbone``.

    Either pass a full ``cfg`` (checked against the method) or keyword ``overrides`` of the method defaults.
    """
    defaults, check = _method(name)
    if cfg is not None and overrides:
        raise ValueError("pass either cfg or keyword overrides to build_objective, not both")
    cfg = cfg if cfg is not None else defaults(**overrides)
    check(cfg)
    return SelfDistillationObjective(backbone, cfg)


def _method(name: str) -> tuple[Callable[..., ObjectiveConfig], Callable[[ObjectiveConfig], None]]:
    if name not in _METHODS:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(_METHODS)}")
    return _METHODS[name]


__all__ = [
    "CENTERING_MODES",
    "OBJECTIVES",
    "ObjectiveConfig",
    "SSLNetwork",
    "SelfDistillationObjective",
    "build_objective",
    "default_config",
]
