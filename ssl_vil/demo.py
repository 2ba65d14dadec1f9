"""End-to-end demo on the embedded digits set: ``make demo`` (= ``python -m ssl_vil.demo``).

digits -> WebDataset shards -> DINO pretraining of a tiny ViL2 (recipes/demo_digits.yaml) -> export -> k-NN of
the pretrained teacher backbone and of the same architecture at random init -> both kNN@20 numbers + plots.
Re-running resumes or reuses what is already there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo_digits.yaml"


def _make_shards(out: Path) -> tuple[Path, Path]:
    from ssl_vil.data.make_shards import main as make_shards

    train, val = out / "train", out / "val"
    for split, path in (("train", train), ("val", val)):
        code = make_shards(["builtin:digits", str(path), "--split", split])
        if code:
            raise SystemExit(f"writing the digits {split} shards into {path} failed (exit {code})")
    return train, val


def _random_init_export(run_dir: Path, out: Path, seed: int) -> Path:
    """The pretrained run's architecture at random init, saved like an export (the k-NN baseline)."""
    from safetensors.torch import save_file

    from ssl_vil.export import EXPORT_INFO, EXPORT_WEIGHTS, build_backbone

    info = json.loads((run_dir / "export" / EXPORT_INFO).read_text())
    torch.manual_seed(seed)
    model = build_backbone(info)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / EXPORT_WEIGHTS))
    (out / EXPORT_INFO).write_text(json.dumps(info | {"step": 0}, indent=2))
    return out / EXPORT_WEIGHTS


def _knn20(weights: Path, train: Path, val: Path, out: Path) -> float:
    from ssl_vil.eval.knn import main as knn

    res = knn(["--weights", str(weights), "--train-data", str(train), "--val-data", str(val), "--k", "10", "20",
               "--num-workers", "0", "--output-dir", str(out)])
    return next(r["top1"] for r in res["results"] if r["k"] == 20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of recipes/demo_digits.yaml")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out: Path = args.output_dir
    t0 = time.perf_counter()
    train_shards, val_shards = _make_shards(out / "shards")

    from ssl_vil.report import main as report
    from ssl_vil.train.cli import main as train

    run_dir = out / "run"
    code = train(["--config", str(RECIPE), "--output-dir", str(run_dir), f"data.train={train_shards}", *args.overrides])
    if code:
        print(f"pretraining stopped with exit code {code}; see {run_dir}", file=sys.stderr)
        return code
    t_train = time.perf_counter() - t0
    pretrained = _knn20(run_dir / "export" / "teacher_backbone.safetensors", train_shards, val_shards, out / "knn_pretrained")
    random_init = _knn20(_random_init_export(run_dir, out / "random_init", seed=0), train_shards, val_shards,
                         out / "knn_random_init")
    report([str(run_dir)])
    print()
    print(f"digits val kNN@20 top-1: pretrained teacher {pretrained:.1f} %  |  random init {random_init:.1f} %"
          f"   (target >= 95 %; pretraining + shards {t_train / 60:.1f} min, total {(time.perf_counter() - t0) / 60:.1f} min)")
    print(f"run dir: {run_dir}  (plots in {run_dir / 'plots'}, metrics in {run_dir / 'metrics.jsonl'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
