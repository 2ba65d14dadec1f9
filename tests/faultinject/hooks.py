"""Install the fault wrappers on the library's seams, now or as soon as each module is imported.

A module already imported is patched at once; for the others a meta-path finder wraps the module's loader so the
patch runs right after the module body (before anything can bind the original). Nothing is imported eagerly, so
a process that never imports the trainer pays nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

_MARK = "__faultinject_original__"

# (holder, attribute name, original value) of every applied patch, for uninstall
_applied: list[tuple[Any, str, Any]] = []
_pending: set[str] = set()
_finder: _PatchingFinder | None = None


def _replace(holder: Any, name: str, make: Callable[[Any], Any], where: str) -> None:
    original = getattr(holder, name, None)
    if original is None:
        raise AttributeError(f"faultinject: seam {where}.{name} not found; the fault hooks need it")
    if getattr(original, _MARK, None) is not None:
        return  # already wrapped
    wrapper = make(original)
    setattr(wrapper, _MARK, original)
    setattr(holder, name, wrapper)
    _applied.append((holder, name, original))


def _patch_loop(mod: ModuleType) -> None:
    from faultinject.trainer import wrap_train_step

    _replace(mod, "train_step", wrap_train_step, mod.__name__)


def _patch_step(mod: ModuleType) -> None:
    from faultinject.trainer import wrap_clip

    _replace(mod, "clip_per_submodule", wrap_clip, mod.__name__)


def _patch_objective(mod: ModuleType) -> None:
    from faultinject.trainer import wrap_forward

    _replace(mod.SelfDistillationObjective, "forward", wrap_forward, f"{mod.__name__}.SelfDistillationObjective")


def _patch_checkpoint(mod: ModuleType) -> None:
    from faultinject.checkpoint import LATEST_WRITERS, wrap_latest_writer, wrap_save, wrap_write_file_durably
    from ssl_vil.checkpoint.layout import LATEST_NAME, MANIFEST_NAME, PAYLOAD_SUFFIX

    _replace(mod.CheckpointManager, "save", wrap_save, f"{mod.__name__}.CheckpointManager")
    _replace(mod, "write_file_durably", lambda f: wrap_write_file_durably(f, PAYLOAD_SUFFIX, MANIFEST_NAME),
             mod.__name__)
    # the LATEST pointer's writer: whichever atomic small-file writer the manager uses
    writers = [name for name in LATEST_WRITERS if hasattr(mod, name)]
    if not writers:
        raise AttributeError(f"faultinject: none of {LATEST_WRITERS} found in {mod.__name__}; the fault hooks need one")
    for name in writers:
        _replace(mod, name, lambda f: wrap_latest_writer(f, LATEST_NAME), mod.__name__)


SEAMS: dict[str, Callable[[ModuleType], None]] = {
    "ssl_vil.train.loop": _patch_loop,  # train_step
    "ssl_vil.train.step": _patch_step,  # clip_per_submodule
    "ssl_vil.objectives.self_distillation": _patch_objective,  # SelfDistillationObjective.forward
    "ssl_vil.checkpoint.manager": _patch_checkpoint,  # CheckpointManager.save, write_file_durably, LATEST writer
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if self._name in _pending:
            _pending.discard(self._name)
            SEAMS[self._name](module)

    def __getattr__(self, item: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, item)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _PatchingFinder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, fullname)
        return spec


def install() -> None:
    """Wrap every seam (idempotent). The wrappers read ``SSL_VIL_FAULT`` / ``SSL_VIL_KEYLOG`` at each call."""
    global _finder
    for name, patch in SEAMS.items():
        module = sys.modules.get(name)
        if module is not None:
            _pending.discard(name)
            patch(module)
        else:
            _pending.add(name)
    if _pending and _finder is None:
        _finder = _PatchingFinder()
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Put every original back and stop patching future imports."""
    global _finder
    if _finder is not None:
        sys.meta_path.remove(_finder)
        _finder = None
    _pending.clear()
    while _applied:
        holder, name, original = _applied.pop()
        setattr(holder, name, original)


def installed() -> bool:
    return bool(_applied) or _finder is not None
