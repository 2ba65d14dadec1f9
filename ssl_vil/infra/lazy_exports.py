"""Package attributes imported on first use (PEP 562), so ``import ssl_vil.config`` stays light (no torch) for the
launcher and the CLI parsers while ``from ssl_vil.data import build_train_stream`` keeps working."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """The module-level ``__getattr__`` for ``package``: ``name`` in ``table`` is imported from the module
    ``table[name]`` on first access and cached in the package; any other name is an AttributeError."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
