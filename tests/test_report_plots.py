"""``python -m ssl_vil.report RUN``: PNG plots from metrics.jsonl, graceful with missing keys, clear on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_vil.infra.timing import StepTiming
from ssl_vil.report import main
from ssl_vil.train.metrics_log import MetricsLogger

ALL_PLOTS = ["knn.png", "losses.png", "schedules.png", "teacher_entropy.png", "throughput.png"]


def write_full_run(run_dir: Path, n_steps: int = 40) -> None:
    with MetricsLogger(run_dir, rank=0, log_every_steps=10, total_steps=n_steps, tensorboard=False) as logger:
        for step in range(1, n_steps + 1):
            extra = {"knn_top1": 0.1 + step / 100} if step % 10 == 0 else {}
            logger.log_step(
                step, samples_seen=64 * step, epoch=0,
                losses={"loss": 6.0 / step ** 0.5, "dino": 5.0 / step ** 0.5, "ibot": 1.0, "koleo": -0.02},
                diagnostics={"teacher_entropy_ratio": 0.9 - step / 100},
                schedules={"lr": 1e-3 * min(step / 10, 1.0), "wd": 0.04 + step / 1000, "momentum": 0.996,
                           "teacher_temp": 0.04 + step / 2000},
                timing=StepTiming(steps=1, samples=64, data_wait_s=0.01 * (step % 3), compute_s=0.5),
                **extra,
            )
            if step == 20:
                logger.log_event("knn", step=step, knn_top5=0.5)  # eval results may arrive as events too


def check_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 300 and image.height >= 200
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 5  # something was drawn


def test_report_writes_all_plots(tmp_path, capsys):
    write_full_run(tmp_path)
    capsys.readouterr()
    assert main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ALL_PLOTS
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ALL_PLOTS
    for name in ALL_PLOTS:
        check_png(tmp_path / "plots" / name)


def test_report_skips_plots_whose_keys_are_missing(tmp_path, capsys):
    lines = [{"step": s, "losses": {"dino": 1.0 / s}} for s in range(1, 6)] + [{"event": "start"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "los')
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert [Path(p).name for p in out.out.split()] == ["losses.png"]
    assert "skipped 1 unparsable line(s): [7]" in out.err
    check_png(tmp_path / "plots" / "losses.png")


def test_missing_or_empty_metrics_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics file not found" in err and str(tmp_path / "metrics.jsonl") in err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path)]) == 2
    assert "no step records" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    write_full_run(tmp_path, n_steps=12)
    proc = subprocess.run([sys.executable, "-m", "ssl_vil.report", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(Path(p).name for p in proc.stdout.split()) == ALL_PLOTS
