"""``bench/gpu_check.py --dry-run``: every stage of the GPU check runs on CPU at tiny sizes and prints its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_executes_every_stage(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    steps = [(r["model"], r["compile"]) for r in rows if r["stage"] == "ssl-step"]
    assert steps == [("ViL-S/16", False), ("ViT-S/16", False), ("ViL-S/16", True), ("ViT-S/16", True)]
    assert all(r["s_per_step"] > 0 and r["what"].endswith("fp32") for r in rows if r["stage"] == "ssl-step")
    kernels = [(r["model"], r["mode"], r["tokens"]) for r in rows if r["stage"] == "mlstm"]
    assert sorted(kernels) == sorted((b, m, 196) for b in ("parallel", "chunkwise") for m in ("fwd", "fwd+bwd"))
    for line in ("ViL / ViT img/s, compile=False:", "ViL / ViT img/s, compile=True:", "parallel / chunkwise"):
        assert line in proc.stdout
    assert proc.stdout.startswith("device: cpu")
