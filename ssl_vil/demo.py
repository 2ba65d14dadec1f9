"""End-to-end demo on the embedded digits set: ``make demo`` (= ``python -m ssl_vil.demo``).

digits -> WebDataset shards -> DINO pretraining of a tiny ViL2 (recipes/demo_digits.yaml) -> export -> k-NN of
the pretrained teacher backbone, of the same architecture at random init and of the raw pixels -> the three
kNN@20 numbers + plots.
The baselines are the public ``python eval/knn.py --weights random:RUN --init-seed 0 ...`` and
``--weights pixels:RUN`` (printed at the end).
Re-running resumes or reuses what is already there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors

PROG = "python -m ssl_vil.demo"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo_digits.yaml"


def make_digits_shards(out: Path) -> tuple[Path, Path]:
    from ssl_vil.data.make_shards import main as make_shards

    train, val = out / "train", out / "val"
    for split, path in (("train", train), ("val", val)):
        code = make_shards(["builtin:digits", str(path), "--split", split])
        if code:
            raise SystemExit(f"writing the digits {split} shards into {path} failed (exit {code})")
    return train, val


def knn_args(weights: str, train: Path, val: Path, out: Path, *extra: str) -> list[str]:
    """``eval/knn.py`` arguments of the demo's k-NN (k = 10, 20 on the digits shards)."""
    return ["--weights", weights, "--train-data", str(train), "--val-data", str(val), "--k", "10", "20",
            "--num-workers", "0", "--output-dir", str(out), *extra]


def knn20(weights: str, train: Path, val: Path, out: Path, *extra: str) -> float:
    """kNN@20 top-1 (%) of ``weights`` (anything ``eval/knn.py --weights`` takes)."""
    from ssl_vil.eval.knn import main as knn

    res = knn(knn_args(weights, train, val, out, *extra))
    return next(r["top1"] for r in res["results"] if r["k"] == 20)


def random_init_knn20(arch: Path, train: Path, val: Path, out: Path, seed: int = 0) -> float:
    """The baseline: kNN@20 of ``arch``'s backbone (a run dir or recipe) at random init, through the public
    ``eval/knn.py --weights random:ARCH --init-seed SEED``."""
    return knn20(f"random:{arch}", train, val, out, "--init-seed", str(seed))


@user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_version(ap)
    ap.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="shards, run dir and k-NN results")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of recipes/demo_digits.yaml")
    args = ap.parse_args(argv)
    out: Path = args.output_dir
    # The overrides are checked before anything is written (the shards take a while); data.train is set below.
    from ssl_vil.config import load_config

    load_config(RECIPE, [f"data.train={out / 'shards' / 'train'}", *args.overrides], world_size=1)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    train_shards, val_shards = make_digits_shards(out / "shards")

    from ssl_vil.report import main as report
    from ssl_vil.train.cli import main as train

    run_dir = out / "run"
    code = train(["--config", str(RECIPE), "--output-dir", str(run_dir), f"data.train={train_shards}", *args.overrides])
    if code:
        print(f"pretraining stopped with exit code {code}; see {run_dir}", file=sys.stderr)
        return code
    t_train = time.perf_counter() - t0
    pretrained = knn20(str(run_dir / "export" / "teacher_backbone.safetensors"), train_shards, val_shards,
                       out / "knn_pretrained")
    random_init = random_init_knn20(run_dir, train_shards, val_shards, out / "knn_random_init", seed=0)
    pixels = knn20(f"pixels:{run_dir}", train_shards, val_shards, out / "knn_pixels")
    report([str(run_dir)])
    print()
    print(f"digits val kNN@20 top-1: pretrained teacher {pretrained:.1f} %  |  random init {random_init:.1f} %  |  "
          f"raw pixels {pixels:.1f} %   (target >= 97 %; pretraining + shards {t_train / 60:.1f} min, total "
          f"{(time.perf_counter() - t0) / 60:.1f} min)")
    print(f"run dir: {run_dir}  (plots in {run_dir / 'plots'}, metrics in {run_dir / 'metrics.jsonl'})")
    baseline = knn_args(f"random:{run_dir}", train_shards, val_shards, out / "knn_random_init", "--init-seed", "0")
    print("random-init baseline: python eval/knn.py " + " ".join(baseline))
    print("raw-pixel baseline:   python eval/knn.py "
          + " ".join(knn_args(f"pixels:{run_dir}", train_shards, val_shards, out / "knn_pixels")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
