"""Several backbones, one recipe, one seed: ``python -m ssl_vil.compare --config recipes/compare/digits.yaml``.

Each variant of the comparison config is the base recipe plus its own ``key=value`` overrides (a backbone, a ViL
block design, a pooling). For each one, in order: pretrain on the digits shards (the embedded set, written once),
k-NN evaluate the exported teacher backbone with ``eval/knn.py``'s protocol (and the same architecture at random
init, seed ``seed``: poolings and backbones start from different baselines), and measure the backbone's
parameters, FLOPs per image at the pretraining size and pretraining throughput. One table (stdout,
``OUT/compare.md``, ``OUT/compare.json``) and one plot (``OUT/compare.png``: kNN@20 against img/s, and against
parameters) come out.

Every variant's config is loaded and checked before the first one trains. Re-running the same command reuses the
variants that finished (``OUT/<variant>/result.json``) and resumes an interrupted one from its checkpoint.
``--quick`` adds the config's ``quick`` overrides (a few steps, a small k-NN set): the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_vil.config import engine
from ssl_vil.config.engine import Config
from ssl_vil.config.errors import ConfigError, invalid
from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors
from ssl_vil.infra.files import write_json_atomic, write_text_atomic

PROG = "python -m ssl_vil.compare"
RESULT_FILE = "result.json"
TABLE_COLUMNS = ("variant", "backbone", "params_m", "gflops", "img_per_s", "knn20_random_init", "knn20_top1",
                 "wall_min")


@dataclass(kw_only=True, slots=True)
class CompareConfig(Config):
    """A comparison: ``base`` recipe (relative to this file) <- ``common`` <- each variant's overrides."""

    base: str = ""
    common: list[str] = field(default_factory=list)  # overrides applied to every variant
    quick: list[str] = field(default_factory=list)  # added by --quick (after the variant's own)
    variants: dict[str, list[str]] = field(default_factory=dict)  # name -> overrides, run in this order
    knn_k: list[int] = field(default_factory=lambda: [10, 20])
    seed: int = 0

    def validate(self) -> None:
        if not self.base:
            raise invalid("base", self.base, "the path of the recipe every variant starts from")
        if not self.variants:
            raise invalid("variants", self.variants, "at least one variant (name: [key=value, ...])")
        for name in self.variants:
            if not name or "/" in name or name.startswith("."):
                raise invalid(f"variants.{name}", name, "a name usable as a folder name")
        if 20 not in self.knn_k:
            raise invalid("knn_k", self.knn_k, "a list of k that includes 20 (the compared number)")


@dataclass
class Variant:
    name: str
    overrides: list[str]
    cfg: Any  # the resolved RunConfig


def load_compare_config(path: Path) -> CompareConfig:
    return engine.load(CompareConfig, path)


def plan(cfg: CompareConfig, config_path: Path, train_shards: Path, *, quick: bool) -> list[Variant]:
    """Every variant's resolved run config, checked before anything trains; an error names the variant."""
    from ssl_vil.config import load_config

    base = (config_path.parent / cfg.base).resolve()
    if not base.is_file():
        raise ConfigError(f"got {cfg.base!r}, but {base} is not a file; expected a recipe path relative to "
                          f"{config_path}", key="base")
    variants = []
    for name, own in cfg.variants.items():
        overrides = [*cfg.common, *own, *(cfg.quick if quick else []), f"data.train={train_shards}",
                     f"train.seed={cfg.seed}"]
        try:
            run_cfg = load_config(base, overrides, world_size=1)
        except ConfigError as exc:
            raise ConfigError(f"variant {name!r} ({' '.join(own) or 'no overrides'}): {exc}") from None
        variants.append(Variant(name=name, overrides=overrides, cfg=run_cfg))
    return variants


def backbone_cost(run_cfg: Any) -> dict[str, float]:
    """Backbone parameters (millions) and forward GFLOPs for one global crop at the pretraining size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ssl_vil.train.build import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone(run_cfg).eval()
    size = run_cfg.data.augment.global_size
    params = sum(p.numel() for p in backbone.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.forward_features(torch.zeros(1, 3, size, size))
    return {"params_m": params / 1e6, "gflops": counter.get_total_flops() / 1e9}


def mean_img_per_s(run_dir: Path) -> float | None:
    """Mean of the logged throughput windows of a run (the first window, with start-up, left out when possible)."""
    from ssl_vil.infra.files import read_jsonl

    rates = [r["img_per_s"] for r in read_jsonl(run_dir / "metrics.jsonl")
             if "event" not in r and isinstance(r.get("img_per_s"), (int, float))]
    rates = rates[1:] if len(rates) > 1 else rates
    return sum(rates) / len(rates) if rates else None


def run_variant(v: Variant, base: Path, out: Path, train: Path, val: Path, knn_k: list[int],
                seed: int) -> dict[str, Any]:
    """Pretrain, export, k-NN; the result dict (also ``OUT/<variant>/result.json``)."""
    from ssl_vil.eval.knn import main as knn
    from ssl_vil.train.cli import main as train_main

    vdir = out / v.name
    t0 = time.perf_counter()
    code = train_main(["--config", str(base), "--output-dir", str(vdir / "run"), *v.overrides])
    if code:
        raise RuntimeError(f"variant {v.name!r}: pretraining stopped with exit code {code}; see {vdir / 'run'}")
    wall = time.perf_counter() - t0
    # eval/knn.py's default feature is the one the DINO head was trained on (the mean token for an "avg" run)
    res = knn(["--weights", str(vdir / "run"), "--train-data", str(train), "--val-data", str(val),
               "--k", *map(str, knn_k), "--num-workers", "0", "--output-dir", str(vdir / "knn")])
    top1 = {r["k"]: r["top1"] for r in res["results"]}
    res0 = knn(["--weights", f"random:{vdir / 'run'}", "--init-seed", str(seed), "--train-data", str(train),
                "--val-data", str(val), "--k", "20", "--num-workers", "0",
                "--output-dir", str(vdir / "knn_random_init")])
    m = v.cfg.model
    result = {"variant": v.name, "backbone": m.name, "overrides": v.overrides, **backbone_cost(v.cfg),
              "img_per_s": mean_img_per_s(vdir / "run"), "knn20_top1": top1[20],
              "knn20_random_init": res0["results"][0]["top1"],
              "knn_features": res["features"]["spec"], "knn_top1": {str(k): t for k, t in top1.items()},
              "pooling": v.cfg.objective.pooling,
              "steps": v.cfg.derived.total_steps, "wall_min": wall / 60}
    write_json_atomic(vdir / RESULT_FILE, result)
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    """A markdown table, one row per variant."""
    head = ("| variant | backbone | params (M) | GFLOPs/img | img/s | kNN@20 random init (%) | kNN@20 top-1 (%) "
            "| pretrain (min) |")
    rows = [head, "|" + "---|" * 8]
    for r in results:
        ips = f"{r['img_per_s']:.1f}" if r["img_per_s"] is not None else "-"
        rnd = f"{r['knn20_random_init']:.1f}" if r.get("knn20_random_init") is not None else "-"
        rows.append(f"| {r['variant']} | {r['backbone']} | {r['params_m']:.3f} | {r['gflops']:.4f} | {ips} | "
                    f"{rnd} | {r['knn20_top1']:.1f} | {r['wall_min']:.1f} |")
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """kNN@20 against throughput and against parameters, one labelled point per variant."""
    from matplotlib.figure import Figure

    from ssl_vil.infra.files import atomic_output

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "img_per_s", "pretraining img/s (this machine)"),
                           (axes[1], "params_m", "backbone parameters (M)")):
        for i, r in enumerate(results):
            if r[key] is None:
                continue
            ax.scatter([r[key]], [r["knn20_top1"]], color=f"C{i % 10}", s=40)
            ax.annotate(r["variant"], (r[key], r["knn20_top1"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("kNN@20 top-1 (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("one SSL recipe, one seed: teacher kNN@20 on digits-val")
    fig.tight_layout()
    with atomic_output(path) as f:
        fig.savefig(f, format="png", dpi=110)
    return path


@user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_version(ap)
    ap.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "recipes" /
                    "compare" / "digits.yaml", help="comparison config (variants of one base recipe)")
    ap.add_argument("--output-dir", type=Path, default=Path("runs/compare"), help="shards, one folder per variant, "
                    "compare.md / compare.json / compare.png")
    ap.add_argument("--quick", action="store_true", help="add the config's quick overrides (a smoke run)")
    ap.add_argument("--only", nargs="+", metavar="VARIANT", help="run these variants only")
    args = ap.parse_args(argv)
    cfg = load_compare_config(args.config)
    out: Path = args.output_dir
    if args.only:
        unknown = [n for n in args.only if n not in cfg.variants]
        if unknown:
            raise invalid("--only", unknown, f"variant names of {args.config}: {', '.join(cfg.variants)}")
        cfg.variants = {n: o for n, o in cfg.variants.items() if n in args.only}
    shards = out / "shards"
    variants = plan(cfg, args.config, shards / "train", quick=args.quick)  # all checked before any work

    from ssl_vil.demo import make_digits_shards

    train, val = make_digits_shards(shards)
    base = (args.config.parent / cfg.base).resolve()
    results = []
    for v in variants:
        done = out / v.name / RESULT_FILE
        if done.is_file() and json.loads(done.read_text()).get("overrides") == v.overrides:
            results.append(json.loads(done.read_text()))
            print(f"{v.name}: reusing {done}", file=sys.stderr)
            continue
        print(f"=== {v.name}: {' '.join(cfg.variants[v.name]) or '(the base recipe)'}", file=sys.stderr, flush=True)
        results.append(run_variant(v, base, out, train, val, cfg.knn_k, cfg.seed))
    table = format_table(results)
    write_text_atomic(out / "compare.md", table + "\n")
    write_json_atomic(out / "compare.json", {"config": str(args.config), "quick": args.quick, "results": results})
    png = plot(results, out / "compare.png")
    print(table)
    print(f"\ntable: {out / 'compare.md'}  data: {out / 'compare.json'}  plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
