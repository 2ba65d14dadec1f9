"""``bench/dense.py --quick``: one row per (model, size) with finite positive times, the Markdown tables printed, and
the growth exponent helper on exact power laws."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "dense.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_dense", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_growth_exponents_of_exact_power_laws():
    dense = _bench_module()
    tokens = [256, 576, 1024, 2304, 4096]
    for power in (1.0, 1.5, 2.0):
        fit, two_point = dense.growth_exponents(tokens, [3e-3 * t ** power for t in tokens])
        assert fit == pytest.approx(power, abs=1e-12) and two_point == pytest.approx(power, abs=1e-12)
    # A constant overhead at the small sizes lowers the two-point exponent below the power.
    fit, two_point = dense.growth_exponents([256, 4096], [1.0 + 1e-3 * 256, 1.0 + 1e-3 * 4096])
    expected = math.log(5.096 / 1.256) / math.log(16)
    assert fit == pytest.approx(expected, rel=1e-12) and two_point == pytest.approx(expected, rel=1e-12)
    assert expected < 1.0
    assert dense.grid_tokens(1024) == 4096 and dense.grid_tokens(384) == 576


@pytest.mark.slow
def test_quick_run_has_one_row_per_model_and_size(tmp_path):
    out = tmp_path / "dense.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert sorted((r["model"], r["px"]) for r in rows) == sorted(
        (m, px) for m in ("vil2_t", "vit_s", "vit_t") for px in (64, 128))
    for row in rows:
        assert len(row["times_s"]) == 1 and all(math.isfinite(t) and t > 0 for t in row["times_s"])
        assert math.isfinite(row["median_s"]) and row["median_s"] > 0
        assert row["tokens"] == (row["px"] // 16) ** 2
        # The sequence is the patches (ViL) or [CLS] + patches (ViT).
        assert row["seq_len"] == row["tokens"] + (row["model"] != "vil2_t")
        assert math.isfinite(row["peak_mb"]) and row["peak_mb"] >= 0
    assert set(result["exponents"]) == {"vil2_t", "vit_s", "vit_t"}
    assert all(math.isfinite(e["fit"]) and e["from_px"] == 64 and e["to_px"] == 128
               for e in result["exponents"].values())
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and " px |" in line]
    assert len(table) == 6 and table[0].startswith("| ViL-T v2 | 64 px | 16 |")
    assert "| model | exponent (fit, all sizes) | exponent (two-point) |" in proc.stdout


def test_sizes_that_are_not_multiples_of_the_patch_are_rejected():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "100", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--sizes must be positive multiples of the patch size 16 px, got [100]" in proc.stderr
