"""The test fault hooks themselves: spec parsing, install / uninstall on the library seams, activation in children."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import faultinject
from faultinject import hooks

PROBE = """
import json
import ssl_vil.checkpoint.manager as manager
import ssl_vil.objectives.self_distillation as sd
import ssl_vil.train.loop as loop
import ssl_vil.train.step as step
seams = [loop.train_step, step.clip_per_submodule, sd.SelfDistillationObjective.forward,
         manager.CheckpointManager.save, manager.write_file_durably]
print(json.dumps([hasattr(f, "__faultinject_original__") for f in seams]))
"""


def test_parse_and_match():
    assert faultinject.parse_faults("kill:step=3,at=mid_step;ckpt_write;kill:step=5") == {
        "kill": [{"step": "3", "at": "mid_step"}, {"step": "5"}], "ckpt_write": [{}]}
    with pytest.raises(ValueError, match="expected key=value"):
        faultinject.parse_faults("loss:step")
    with pytest.raises(ValueError, match="empty site name"):
        faultinject.parse_faults(":step=1")


def test_match_filters(monkeypatch):
    monkeypatch.setenv(faultinject.ENV_VAR, "loss:steps=2|4,rank=1,term=ibot;loss:step=7")
    assert faultinject.fault_matches("loss", step=4, rank=1) == {"steps": "2|4", "rank": "1", "term": "ibot"}
    assert faultinject.fault_matches("loss", step=4, rank=0) is None
    assert faultinject.fault_matches("loss", step=7, rank=0) == {"step": "7"}
    assert faultinject.fault_matches("grad", step=7, rank=0) is None
    monkeypatch.delenv(faultinject.ENV_VAR)
    assert faultinject.fault_matches("loss", step=7, rank=0) is None


def test_install_wraps_every_seam_and_uninstall_restores(fault_injection):
    import ssl_vil.checkpoint.manager as manager
    import ssl_vil.train.loop as loop

    assert hasattr(loop.train_step, "__faultinject_original__")
    assert hasattr(manager.CheckpointManager.save, "__faultinject_original__")
    wrapped = loop.train_step
    fault_injection.install()  # idempotent
    assert loop.train_step is wrapped
    fault_injection.uninstall()
    assert not hasattr(loop.train_step, "__faultinject_original__")
    assert not hasattr(manager.write_file_durably, "__faultinject_original__")
    fault_injection.install()  # the fixture uninstalls at the end


def test_seam_list_is_complete():
    assert set(hooks.SEAMS) == {"ssl_vil.train.loop", "ssl_vil.train.step", "ssl_vil.objectives.self_distillation",
                                "ssl_vil.checkpoint.manager"}


@pytest.mark.parametrize("variables", [{}, {faultinject.ENV_VAR: "sleep:step=100000"},
                                       {faultinject.KEYLOG_VAR: "/nonexistent"}], ids=["off", "fault", "keylog"])
def test_child_installs_from_sitecustomize_only_when_asked(variables, tmp_path):
    env = faultinject.child_env()
    for name in (faultinject.ENV_VAR, faultinject.KEYLOG_VAR):
        env.pop(name, None)
    env.update(variables)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [bool(variables)] * 5
