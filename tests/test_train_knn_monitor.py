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
