"""Run a callback right after a module's first import completes (an import-system finder, removed once used)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of one module so that ``callback`` runs after it executes."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the real lookup below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module
        callback = self.callback

        def exec_module(module: ModuleType) -> None:
            real_exec(module)
            callback()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def call_after_import(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once ``import name`` has finished (now, if it already has)."""
    if name in sys.modules:
        callback()
        return
    if not any(isinstance(f, _AfterImportFinder) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportFinder(name, callback))
