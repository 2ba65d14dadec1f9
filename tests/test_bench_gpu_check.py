"""``bench/gpu_check.py --dry-run``: every stage of the GPU check runs on CPU at tiny sizes and prints its table,
using only the packages a GPU machine has (its preinstalled torch stack plus the wheels ``make gpu-wheels`` carries).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_vil.backbones.kernels_form import kernels_available

REPO = Path(__file__).resolve().parents[1]
STAGES = ("tests", "ssl-step", "mlstm", "resolution", "knn")
# The project's dependencies that the GPU machine lacks and `make gpu-wheels` does not carry (not pure Python, or
# not needed there): the dry run must not import them, in gpu_check nor in its pytest subprocess.
ABSENT_ON_GPU_MACHINE = ("numba", "llvmlite", "sklearn", "scipy", "matplotlib", "submitit", "cloudpickle", "lightly",
                         "faiss")


def _positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_dry_run_executes_every_stage(tmp_path):
    # A sitecustomize on PYTHONPATH marks the absent packages unimportable in every Python the run starts.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {ABSENT_ON_GPU_MACHINE!r}:\n"
                                           f"    sys.modules[name] = None  # import raises ModuleNotFoundError\n")
    env = dict(os.environ, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
    blocked = subprocess.run([sys.executable, "-c", "import numba"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr, "the import blocker is not active"

    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["stage"] for r in rows} == set(STAGES)
    assert not [r for r in rows if r.get("kind") == "skipped"], [r for r in rows if r.get("kind") == "skipped"]
    assert all(r["device"].startswith("cpu") for r in rows)
    backends = ["parallel", "chunkwise"] + (["mlstm_kernels"] if kernels_available("cpu") else [])

    # tests: the gpu-marked tests were collected and every one skipped on CPU.
    summary = [r for r in rows if r["stage"] == "tests" and r["kind"] == "summary"]
    cases = [r for r in rows if r["stage"] == "tests" and r["kind"] == "test"]
    assert len(summary) == 1 and summary[0]["status"] == "exit 0", summary
    assert len(cases) >= 6 and all(r["outcome"] == "skipped" and "CUDA" in r["message"] for r in cases), cases
    assert (summary[0]["passed"], summary[0]["failed"], summary[0]["errors"], summary[0]["skipped"]) == (
        0, 0, 0, len(cases))

    # ssl-step: both models eager and compiled, ViL-S per mLSTM backend, and the data-wait row.
    ssl = [r for r in rows if r["stage"] == "ssl-step"]
    steps = [(r["model"], r["compile"]) for r in ssl if r["kind"] == "step"]
    assert steps == [("ViL-S/16", False), ("ViT-S/16", False), ("ViL-S/16", True), ("ViT-S/16", True)]
    assert [r["backend"] for r in ssl if r["kind"] == "backend"] == backends
    wait = [r for r in ssl if r["kind"] == "data-wait"]
    assert len(wait) == 1 and 0 <= wait[0]["data_wait_frac"] < 1 and wait[0]["fetch_s_per_step"] >= 0
    assert all(_positive(r["s_per_step"]) and r["what"].endswith("fp32") and r["batch"] == 4 for r in ssl)

    kernels = [(r["model"], r["mode"], r["tokens"]) for r in rows if r["stage"] == "mlstm"]
    assert sorted(kernels) == sorted((b, m, 196) for b in backends for m in ("fwd", "fwd+bwd"))

    res = [r for r in rows if r["stage"] == "resolution"]
    assert sorted((r["backend"], r["px"], r["tokens"]) for r in res) == sorted(
        (b, px, (px // 16) ** 2) for b in backends for px in (32, 64, 128))
    assert all(r["status"] == "ok" for r in res)

    knn = [r for r in rows if r["stage"] == "knn"]
    assert [r["model"].split()[0] for r in knn] == ["search_torch", "knn_classify"]
    assert all((r["queries"], r["train"], r["dim"]) == (100, 1000, 16) for r in knn)
    assert all(_positive(r["s_per_call"]) for r in rows if "s_per_call" in r)

    assert proc.stdout.startswith("device: cpu")
    for line in [f"### {stage}" for stage in STAGES] + ["ViL / ViT img/s, compile=False:",
                                                        "ViL / ViT img/s, compile=True:", "parallel / chunkwise"]:
        assert line in proc.stdout, line
