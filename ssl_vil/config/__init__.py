"""Typed configs: one engine (:mod:`ssl_vil.config.engine`) and the pretraining run config built on it.

The run config composes the components' own config classes (``ssl_vil.objectives``, ``ssl_vil.objectives.masking``, ...),
and those import :mod:`ssl_vil.config.engine` and :mod:`ssl_vil.config.errors`; so the run-specific names below
load on first use, and importing a component never has to import the run config first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ssl_vil.config.errors import ConfigError
from ssl_vil.infra.lazy_exports import lazy_getattr

if TYPE_CHECKING:
    from ssl_vil.config.engine import parse_override, read_yaml, to_dict, to_yaml
    from ssl_vil.config.load import diff_configs, load_config
    from ssl_vil.config.schema import RunConfig

_LAZY = {
    "RunConfig": "ssl_vil.config.schema",
    "diff_configs": "ssl_vil.config.load",
    "load_config": "ssl_vil.config.load",
    "parse_override": "ssl_vil.config.engine",
    "read_yaml": "ssl_vil.config.engine",
    "to_dict": "ssl_vil.config.engine",
    "to_yaml": "ssl_vil.config.engine",
}

__all__ = ["ConfigError", "RunConfig", "diff_configs", "load_config", "parse_override", "read_yaml", "to_dict",
           "to_yaml"]


__getattr__ = lazy_getattr(__name__, _LAZY)
