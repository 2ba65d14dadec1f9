"""``import ssl_vil`` is cheap (no torch, no timm) and still registers the ViL models with timm, in any order."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_pulls_in_neither_torch_nor_timm():
    assert _python("import sys, ssl_vil; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))") == "[]"


@pytest.mark.parametrize("imports", ["import ssl_vil; import timm", "import timm; import ssl_vil",
                                     "import ssl_vil; from timm import create_model", "import ssl_vil.backbones, timm"])
def test_models_are_registered_whatever_the_import_order(imports):
    code = (f"{imports}\nimport timm\n"
            "m = timm.create_model('vil2_tiny_patch16_224', img_size=32, dim=32, depth=2)\n"
            "print(type(m).__name__, timm.is_model('vil_tiny_patch16_224'))")
    assert _python(code) == "VisionLSTM2 True"


def test_lazy_names_are_what_they_say_after_their_submodules_are_imported():
    """A lazily exported name must not share a submodule's name: importing the submodule would shadow it."""
    code = (
        "import importlib, pkgutil, ssl_vil\n"
        "bad = []\n"
        "for info in pkgutil.iter_modules(ssl_vil.__path__):\n"
        "    pkg = importlib.import_module(f'ssl_vil.{info.name}')\n"
        "    lazy = getattr(pkg, '_LAZY', {})\n"
        "    for module in set(lazy.values()):\n"
        "        importlib.import_module(module)\n"
        "    for name, module in sorted(lazy.items()):\n"
        "        value = getattr(pkg, name)\n"
        "        if value is not getattr(importlib.import_module(module), name):\n"
        "            bad.append(f'{pkg.__name__}.{name}')\n"
        "print(bad)\n"
    )
    assert _python(code) == "[]"
