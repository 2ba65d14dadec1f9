"""Test-only fault injection for the trainer and the checkpoint writer, applied from outside the library.

Faults are planted with ``SSL_VIL_FAULT="site:k=v,...;site2:..."`` (see :mod:`faultinject.spec`); the per-step key
log is switched on with ``SSL_VIL_KEYLOG=DIR`` (see :mod:`faultinject.keylog`). :func:`install` wraps the library
seams listed in :data:`faultinject.hooks.SEAMS`; the wrappers read both variables at every call.

* In a test process: the ``fault_injection`` fixture (tests/conftest.py) installs and uninstalls around a test.
* In a child process (trainer, Slurm / submitit task, script): start it with :func:`child_env`, which puts
  :data:`SITE_DIR` first on ``PYTHONPATH``; its ``sitecustomize`` installs the hooks at interpreter start-up
  when either variable is set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from faultinject.hooks import install, installed, uninstall
from faultinject.keylog import KEYLOG_VAR, read_key_log
from faultinject.spec import ENV_VAR, fault_matches, parse_faults, process_rank
from faultinject.trainer import maybe_inject_signal, maybe_inject_sleep, maybe_kill

TESTS_DIR = Path(__file__).resolve().parents[1]
SITE_DIR = Path(__file__).resolve().parent / "site"

__all__ = ["ENV_VAR", "KEYLOG_VAR", "SITE_DIR", "TESTS_DIR", "child_env", "fault_matches", "install", "installed",
           "maybe_inject_signal", "maybe_inject_sleep", "maybe_kill", "parse_faults", "process_rank", "pythonpath",
           "read_key_log", "uninstall"]


def pythonpath(existing: str | None = None) -> str:
    """``PYTHONPATH`` with the sitecustomize folder and tests/ in front of ``existing`` (default: this process's)."""
    existing = os.environ.get("PYTHONPATH", "") if existing is None else existing
    head = [str(SITE_DIR), str(TESTS_DIR)]
    rest = [p for p in existing.split(os.pathsep) if p and p not in head]
    return os.pathsep.join(head + rest)


def child_env(env: Mapping[str, str] | None = None, *, fault: str | None = None,
              keys_dir: Path | str | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) whose Python children install the hooks: ``PYTHONPATH`` as in
    :func:`pythonpath`, plus ``SSL_VIL_FAULT=fault`` / ``SSL_VIL_KEYLOG=keys_dir`` when given."""
    out = dict(os.environ if env is None else env)
    out["PYTHONPATH"] = pythonpath(out.get("PYTHONPATH", ""))
    if fault is not None:
        out[ENV_VAR] = fault
    if keys_dir is not None:
        out[KEYLOG_VAR] = str(keys_dir)
    return out
