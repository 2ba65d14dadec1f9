"""Speed of ``make demo``'s pretraining on this machine: seconds per step of recipes/demo_digits.yaml, and what
each setting changes, measured side by side in one run.

Each row is a short pretraining run of the demo recipe on the digits shards (``--steps`` steps; the first
``--skip`` are compile/warm-up and not timed) with the row's overrides; rows run one after another, ``--rounds``
times interleaved, and the median is printed. Columns: s/step (trainer's step time: data wait + compute), the
data-wait fraction, img/s, the steps that fit the demo's 10-minute budget, and the ratio to the ``recipe`` row.

    python bench/demo_speed.py [--steps 60] [--skip 20] [--rounds 1] [--rows recipe workers=0 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo_digits.yaml"
BUDGET_S = 600.0

# name -> (overrides, extra environment)
ROWS: dict[str, tuple[list[str], dict[str, str]]] = {
    "recipe": ([], {}),
    "workers=0": (["data.num_workers=0"], {}),
    "workers=2": (["data.num_workers=2"], {}),
    "threads=1": ([], {"OMP_NUM_THREADS": "1"}),
    "chunkwise": (["model.mlstm_backend=chunkwise"], {}),
}


def run_row(shards: Path, out: Path, overrides: list[str], env: dict[str, str], steps: int, skip: int) -> dict:
    """One short run; the mean over its logged intervals after ``skip`` steps."""
    cmd = [sys.executable, "-m", "ssl_vil.train", "--config", str(RECIPE), "--output-dir", str(out),
           f"data.train={shards}", f"schedule.total_steps={steps}", "schedule.warmup_steps=5",
           "schedule.freeze_last_layer_steps=1", f"checkpoint.every_steps={steps}", "logging.log_every_steps=5",
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [x for x in lines if x.get("step_time_s") is not None and x["step"] > skip]
    return {"s_per_step": statistics.fmean(x["step_time_s"] for x in timed),
            "data_wait": statistics.fmean(x["data_wait_fraction"] for x in timed),
            "img_per_s": statistics.fmean(x["img_per_s"] for x in timed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = p.parse_args()
    from ssl_vil.demo import make_digits_shards

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, _ = make_digits_shards(root / "shards")
        results: dict[str, list[dict]] = {name: [] for name in args.rows}
        for r in range(args.rounds):
            for name in args.rows:
                overrides, env = ROWS[name]
                results[name].append(run_row(train, root / f"{name}-{r}", overrides, env, args.steps, args.skip))
    base = statistics.median(x["s_per_step"] for x in results[args.rows[0]])
    print(f"demo recipe, steps {args.skip + 1}..{args.steps} timed, median of {args.rounds} round(s), "
          f"{os.cpu_count()} CPU cores")
    print(f"{'row':<14}{'s/step':>8}{'data-wait':>11}{'img/s':>8}{'steps/10min':>13}{'speed vs ' + args.rows[0]:>18}")
    for name, runs in results.items():
        s = statistics.median(x["s_per_step"] for x in runs)
        wait = statistics.median(x["data_wait"] for x in runs)
        ips = statistics.median(x["img_per_s"] for x in runs)
        print(f"{name:<14}{s:>8.3f}{wait:>10.0%}{ips:>8.1f}{BUDGET_S / s:>13.0f}{base / s:>17.2f}x")


if __name__ == "__main__":
    main()
