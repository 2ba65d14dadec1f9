"""Every command's ``--help`` and ``--version`` work without importing torch, timm or torchvision.

Not a timing test: the heavy imports are what make start-up slow, so the check is which modules the process had
imported when it exited (``bench/cli_startup.py`` measures the time).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ssl_vil

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision")

# (name, how to run it): a module for ``python -m``, or a script path.
COMMANDS = [
    ("train", "-m", "ssl_vil.train"),
    ("eval.knn", "-m", "ssl_vil.eval.knn"),
    ("eval.linear", "-m", "ssl_vil.eval.linear"),
    ("eval.finetune", "-m", "ssl_vil.eval.finetune"),
    ("eval/knn.py", "script", "eval/knn.py"),
    ("eval/linear.py", "script", "eval/linear.py"),
    ("eval/finetune.py", "script", "eval/finetune.py"),
    ("export", "-m", "ssl_vil.export"),
    ("report", "-m", "ssl_vil.report"),
    ("data.make_shards", "-m", "ssl_vil.data.make_shards"),
    ("demo", "-m", "ssl_vil.demo"),
    ("cluster/submit.py", "script", "cluster/submit.py"),
]

# Runs the command in this interpreter as ``python -m`` / ``python script`` would, then reports the heavy modules
# imported by the time the process exits (argparse's --help / --version exit through SystemExit).
PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr))
kind, target, flag = sys.argv[1:4]
if kind == "-m":
    sys.argv = [target, flag]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = [target, flag]
    sys.path.insert(0, str(__import__("pathlib").Path(target).resolve().parent))
    runpy.run_path(target, run_name="__main__")
"""


def _run(kind: str, target: str, flag: str) -> subprocess.CompletedProcess[str]:
    code = PROBE.format(heavy=HEAVY)
    return subprocess.run([sys.executable, "-c", code, kind, target, flag], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _heavy(proc: subprocess.CompletedProcess[str]) -> str:
    return next(line for line in proc.stderr.splitlines() if line.startswith("HEAVY ")).split(" ", 1)[1]


@pytest.mark.parametrize("name, kind, target", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_is_light_and_shows_defaults(name: str, kind: str, target: str) -> None:
    proc = _run(kind, target, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--version" in proc.stdout, proc.stdout
    assert _heavy(proc) == "[]", f"{name} --help imported {_heavy(proc)}"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name, kind, target", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_version_is_light(name: str, kind: str, target: str) -> None:
    proc = _run(kind, target, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ssl_vil {ssl_vil.__version__}"
    assert _heavy(proc) == "[]", f"{name} --version imported {_heavy(proc)}"


def test_help_shows_defaults() -> None:
    """Options with a default say so in --help (e.g. k-NN's --k and --temperature, the demo's --output-dir)."""
    knn = _run("-m", "ssl_vil.eval.knn", "--help").stdout
    assert "(default: [10, 20, 100, 200])" in knn and "(default: 0.07)" in knn
    assert "(default: runs/demo)" in _run("-m", "ssl_vil.demo", "--help").stdout
    assert "(default: 1)" in _run("script", "cluster/submit.py", "--help").stdout


def test_exit_codes_are_importable_without_torch() -> None:
    """cluster/job.py reads REQUEUE_EXIT_CODE from the entry module; the train CLI gives it without torch."""
    code = ("import sys; from ssl_vil.train.cli import REQUEUE_EXIT_CODE, INTERRUPT_EXIT_CODE, GUARD_EXIT_CODE, "
            "REFUSED_EXIT_CODE; print(REQUEUE_EXIT_CODE, INTERRUPT_EXIT_CODE, GUARD_EXIT_CODE, REFUSED_EXIT_CODE, "
            f"sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["75", "130", "3", "2", "[]"], out.stderr
    from ssl_vil.train import preemption

    assert (preemption.REQUEUE_EXIT_CODE, preemption.INTERRUPT_EXIT_CODE) == (75, 130)


def test_config_typo_is_rejected_without_timm_or_torchvision(tmp_path: Path) -> None:
    code = (f"import atexit, runpy, sys\n"
            f"atexit.register(lambda: print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules), "
            f"file=sys.stderr))\n"
            f"sys.argv = ['ssl_vil.train', '--config', 'recipes/demo_digits.yaml', '--output-dir', "
            f"{str(tmp_path / 'run')!r}, 'optim.lrr=0.1']\n"
            f"runpy.run_module('ssl_vil.train', run_name='__main__', alter_sys=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optim.lrr: unknown key; did you mean optim.lr?" in proc.stderr
    assert "timm" not in _heavy(proc) and "torchvision" not in _heavy(proc), _heavy(proc)
    assert not (tmp_path / "run").exists()
