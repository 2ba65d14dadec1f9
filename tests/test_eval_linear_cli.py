"""eval/linear.py end to end on a small digits ImageFolder (precomputed-feature mode)."""

from __future__ import annotations

import json

import torch
from test_eval_knn_cli import export_random_vil, small_digits  # noqa: F401  (fixture)

from ssl_vil.eval import linear_probe as linear


def test_linear_cli_grid_and_selections(small_digits, tmp_path):  # noqa: F811
    from ssl_vil.eval.linear import main

    torch.set_num_threads(1)
    folder, _ = small_digits
    weights = export_random_vil(tmp_path / "export")
    out = tmp_path / "linear"
    res = main(["--weights", str(weights), "--train-data", str(folder / "train"), "--val-data", str(folder / "val"),
                "--precompute-features", "--train-epochs", "20", "--batch-size", "32", "--lrs", "0.001", "0.1", "1.0",
                "--block-counts", "1", "4", "--heldout-fraction", "0.2", "--num-workers", "0",
                "--output-dir", str(out)])
    assert json.loads((out / "results_linear.json").read_text())["summary"] == res["summary"]
    # The tiny model has 2 block pairs: "last 4" is capped to 2.
    assert res["block_counts"] == [1, 2]
    assert len(res["heads"]) == 3 * 2 * 2
    keys = [p.relative_to(folder / "train").as_posix() for p in sorted((folder / "train").rglob("*.png"))]
    expected_heldout = sum(linear.is_heldout(k, 0.2) for k in keys)
    assert res["n_heldout"] == expected_heldout and res["n_train_fit"] == 240 - expected_heldout
    assert res["n_val"] == 70 and res["num_classes"] == 10
    picked = res["heldout_selected"]
    rows = {r["name"]: r for r in res["heads"]}
    assert picked["heldout_top1"] == max(r["heldout_top1"] for r in rows.values())
    assert picked["val_top1"] == rows[picked["head"]]["val_top1"]
    assert res["val_selected"]["val_top1"] == max(r["val_top1"] for r in rows.values())
    # Random-init features of digits are linearly informative: far above chance (10 %).
    assert res["val_selected"]["val_top1"] > 50.0
