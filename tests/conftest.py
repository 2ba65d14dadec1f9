"""Suite-wide fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test starts from the same environment: a test (or code under test, e.g. the Slurm launcher exporting
    RANK / WORLD_SIZE) that writes os.environ directly must not make a later in-process run wait for peers."""
    saved = dict(os.environ)
    yield
    for k in set(os.environ) - set(saved):
        del os.environ[k]
    os.environ.update(saved)


@pytest.fixture
def fault_injection():
    """The test fault hooks (tests/faultinject) in this process for one test; plant faults with
    ``monkeypatch.setenv("SSL_VIL_FAULT", ...)``."""
    import faultinject

    was_installed = faultinject.installed()
    faultinject.install()
    yield faultinject
    if not was_installed:
        faultinject.uninstall()
