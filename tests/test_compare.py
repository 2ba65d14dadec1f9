"""``python -m ssl_vil.compare --quick``: every variant of recipes/compare/digits.yaml pretrains, exports and is
k-NN evaluated under one recipe; one table, one JSON, one plot; a re-run reuses finished variants; a bad variant is
refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes" / "compare" / "digits.yaml"


def _compare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "ssl_vil.compare", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=1800)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("compare") / "out"
    proc = _compare("--config", str(CONFIG), "--quick", "--output-dir", str(out), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_comparison_runs_every_variant_in_order(quick_run):
    out, proc = quick_run
    variants = yaml.safe_load(CONFIG.read_text())["variants"]
    data = json.loads((out / "compare.json").read_text())
    results = data["results"]
    assert data["quick"] is True
    assert [r["variant"] for r in results] == list(variants)
    for r in results:
        assert r["steps"] == 2
        assert r["params_m"] > 0 and r["gflops"] > 0
        assert 0.0 <= r["knn20_top1"] <= 100.0
        assert (out / r["variant"] / "run" / "export" / "teacher_backbone.safetensors").is_file()
        assert json.loads((out / r["variant"] / "knn" / "results_knn.json").read_text())["results"]
        # the same architecture at random init (seed 0) is the row's baseline
        rnd = json.loads((out / r["variant"] / "knn_random_init" / "results_knn.json").read_text())
        assert rnd["results"][0]["top1"] == r["knn20_random_init"] and rnd["weights_source"].endswith("(init seed 0)")
        assert rnd["model"] == r["backbone"]
        # k-NN reads the feature the head was trained on: the mean patch token for an "avg" run
        trained = json.loads((out / r["variant"] / "knn" / "results_knn.json").read_text())
        expected = ("avg", "bilateral_concat") if r["pooling"] == "avg" else ("cls", r["pooling"])
        assert (trained["features"]["spec"], trained["features"]["cls_pooling"]) == expected
        assert rnd["features"]["spec"] == expected[0]
    by_name = {r["variant"]: r for r in results}
    # the ViT is a real timm ViT with its [CLS] token, matched in parameters to the ViL2 within 25 %
    assert by_name["vit_matched"]["backbone"].startswith("vit_") and by_name["vit_matched"]["pooling"] == "cls"
    ratio = by_name["vit_matched"]["params_m"] / by_name["vil2_alternating"]["params_m"]
    assert 0.75 < ratio < 1.25, ratio
    # a bidirectional block has two mLSTMs per block: more parameters than the alternating design
    assert by_name["vil2_bi"]["params_m"] > by_name["vil2_alternating"]["params_m"]
    assert by_name["vil2_uni"]["params_m"] == by_name["vil2_alternating"]["params_m"]
    # the table: a header, a rule and one row per variant, printed and written
    table = (out / "compare.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(variants) and all(f"| {name} |" in "\n".join(table) for name in variants)
    assert "\n".join(table) in proc.stdout
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_reuses_finished_variants(quick_run):
    out, _ = quick_run
    before = json.loads((out / "compare.json").read_text())["results"]
    proc = _compare("--config", str(CONFIG), "--quick", "--output-dir", str(out), "--only", "vil2_alternating",
                    "vit_matched", cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("reusing") == 2
    after = json.loads((out / "compare.json").read_text())["results"]
    assert after == [r for r in before if r["variant"] in ("vil2_alternating", "vit_matched")]


def test_a_bad_variant_is_refused_before_anything_is_written(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"base: {REPO / 'recipes' / 'demo_digits.yaml'}\n"
                      "variants:\n  good: []\n  typo: [model.block_desing=uni]\n")
    out = tmp_path / "out"
    proc = _compare("--config", str(config), "--output-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 2
    assert "variant 'typo'" in proc.stderr and "model.block_desing" in proc.stderr
    assert "did you mean" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    proc = _compare("--config", str(config), "--output-dir", str(out), "--only", "nope", cwd=tmp_path)
    assert proc.returncode == 2 and "--only" in proc.stderr and "good, typo" in proc.stderr
