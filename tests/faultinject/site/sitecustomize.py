"""Installs the test fault hooks in a Python process started with this folder on ``PYTHONPATH``.

Active only when ``SSL_VIL_FAULT`` or ``SSL_VIL_KEYLOG`` is set; then chains to the next ``sitecustomize`` on the
path (this one shadows it).
"""

import importlib.machinery
import importlib.util
import os
import sys


def _activate() -> None:
    if not (os.environ.get("SSL_VIL_FAULT") or os.environ.get("SSL_VIL_KEYLOG")):
        return
    tests_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if tests_dir not in sys.path:
        sys.path.append(tests_dir)
    import faultinject

    faultinject.install()


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_activate()
_chain()
