"""The periodic k-NN monitor logs accuracy at the planned steps and leaves training bitwise unchanged."""

from __future__ import annotations

import pytest

from ssl_vil.report import make_report
from trainer_harness import logs, losses, records, run_training, tiny_overrides, write_shards


@pytest.mark.slow
def test_knn_monitor_logs_and_does_not_perturb_training(tmp_path):
    write_shards(tmp_path / "train", n_shards=2, per_shard=40)
    write_shards(tmp_path / "val", n_shards=1, per_shard=30)
    base = tiny_overrides(tmp_path / "train", total_steps=10, workers=1)
    monitored = base + ["knn_monitor.every_steps=5", f"knn_monitor.train={tmp_path / 'train'}",
                        f"knn_monitor.val={tmp_path / 'val'}", "knn_monitor.k=[5,20]", "knn_monitor.batch_size=32"]
    plain, mon = tmp_path / "plain", tmp_path / "mon"
    assert run_training(plain, base) == [0], logs(plain)
    assert run_training(mon, monitored) == [0], logs(mon)
    assert losses(mon) == losses(plain)
    events = [r for r in records(mon) if r.get("event") == "knn"]
    assert [e["step"] for e in events] == [5, 10]
    for e in events:
        assert e["knn_top1"] == e["knn_top1_k5"] and 0.0 <= e["knn_top1"] <= 100.0
        # 30 val images: accuracy is a multiple of 1/30
        assert abs(e["knn_top1_k20"] * 30 / 100 - round(e["knn_top1_k20"] * 30 / 100)) < 1e-6
    assert any(p.name == "knn.png" for p in make_report(mon))


@pytest.mark.slow
def test_knn_monitor_and_knn_cli_agree_on_the_same_checkpoint(tmp_path):
    """One protocol: the monitor's accuracy at the last step equals eval/knn.py's on the run's exported teacher,
    on the same bank / query shards with the same k and temperature (both centre-crop at crop_pct 0.875)."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from ssl_vil.data import make_shards
    from trainer_harness import ROOT

    # Noise images with random labels: neighbours hinge on pixel detail, so a different crop changes the score.
    rng = np.random.default_rng(0)
    for split, n in (("bank", 70), ("query", 40)):
        for i in range(n):
            folder = tmp_path / f"{split}_images" / f"c{rng.integers(5)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{split}{i}.png")
        assert make_shards.main([str(tmp_path / f"{split}_images"), str(tmp_path / split), "--maxcount", "32"]) == 0
    write_shards(tmp_path / "train", n_shards=2, per_shard=24)
    overrides = tiny_overrides(tmp_path / "train", total_steps=4, workers=1) + [
        "knn_monitor.every_steps=4", f"knn_monitor.train={tmp_path / 'bank'}", f"knn_monitor.val={tmp_path / 'query'}",
        "knn_monitor.k=[1,5,20]", "knn_monitor.batch_size=16"]
    run = tmp_path / "run"
    assert run_training(run, overrides) == [0], logs(run)
    (event,) = [r for r in records(run) if r.get("event") == "knn"]
    assert event["step"] == 4
    assert (event["knn_k"], event["knn_temperature"], event["knn_crop_pct"]) == ([1, 5, 20], 0.07, 0.875)
    assert event["knn_num_classes"] == 5

    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_vil.eval.knn", "--weights", str(run), "--train-data", str(tmp_path / "bank"),
         "--val-data", str(tmp_path / "query"), "--k", "1", "5", "20", "--batch-size", "16", "--num-workers", "0",
         "--device", "cpu", "--output-dir", str(out)],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results_knn.json").read_text())
    assert res["weights_source"].endswith("step_00000004")
    assert (res["k"], res["temperature"], res["crop_pct"]) == ([1, 5, 20], 0.07, 0.875)
    assert res["n_train"] == 70 and res["n_val"] == 40
    for row in res["results"]:
        assert event[f"knn_top1_k{row['k']}"] == row["top1"], (row, event)
        assert event[f"knn_top5_k{row['k']}"] == row["top5"], (row, event)
