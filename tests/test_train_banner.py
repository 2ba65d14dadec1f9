"""A run opens with a banner (model and size, data, schedule, device, precision) and ends with a summary (final
numbers, the export, the next commands): checked against the run's own config and metrics."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_harness import logs, losses, run_training, tiny_overrides, write_shards  # noqa: E402


def test_banner_and_end_summary_state_the_run(tmp_path):
    from ssl_vil.config import load_config
    from ssl_vil.train.build import build_ssl_objective

    write_shards(tmp_path / "shards")
    run = tmp_path / "run"
    assert run_training(run, tiny_overrides(tmp_path / "shards", total_steps=4, workers=0)) == [0], logs(run)
    text = logs(run)
    cfg = load_config(run / "config.yaml", world_size=1)
    student = build_ssl_objective(cfg).student
    n_backbone = sum(p.numel() for p in student.backbone.parameters())
    n_heads = sum(p.numel() for p in student.parameters()) - n_backbone
    banner = text[text.index("ssl_vil 0.1.0: new run in"):].splitlines()[:6]
    assert banner[0] == f"ssl_vil 0.1.0: new run in {run}"
    assert banner[1] == (f"  model     {cfg.model.name} (dim 64, depth 2, patch {cfg.model.patch_size}): backbone "
                         f"{n_backbone / 1e6:.2f}M parameters, heads {n_heads / 1e6:.2f}M")
    assert banner[3] == f"  data      {tmp_path / 'shards'}: 144 samples per epoch, 18 steps per epoch"
    assert banner[4] == "  schedule  4 steps (~0.2 epochs) of 8 images, peak lr 0.002"
    assert banner[5] == "  device    cpu x 1 process(es), fp32, 0 loader worker(s) per process"
    summary = text[text.index("done: 4 steps in"):].splitlines()
    assert summary[0].endswith(f"; last loss {losses(run)[4]:.4f}")
    export = run / "export" / "teacher_backbone.safetensors"
    assert summary[1] == f"  export    {export}" and export.is_file()
    assert summary[4] == f"            python -m ssl_vil.report {run}"
