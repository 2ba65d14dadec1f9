"""One GPU check: ViL-S against ViT-S under the same DINOv2 step, eager and compiled, and the mLSTM kernels.

Stages, each measured side by side in one process (rows alternate call by call, best-of-N after warm-up):

1. ``ssl-step``: one full self-distillation step of recipes/vil2_s16_dinov2_in1k.yaml and of
   recipes/vit_s16_dinov2_in1k.yaml (the same recipe with the backbone changed): student forward on 2 global + 8
   local crops, teacher forward, DINO + iBOT + KoLeo losses, backward, AdamW, EMA; in the run's precision (bf16
   autocast on GPU). Rows: eager, then ``torch.compile`` of the student (as ``train.compile=true`` does). Columns:
   s/step, img/s, peak memory, and ViL / ViT img/s (goal on a GPU: >= 0.8 with compile on).
2. ``mlstm``: the mLSTM kernels alone, ``parallel`` against ``chunkwise``, forward and forward + backward, at 3136
   tokens (the spec's kernel setup: B=2, NH=4, DH=48), in the run's precision.

    python bench/gpu_check.py                 # on a GPU machine: the real sizes (a few minutes)
    python bench/gpu_check.py --dry-run       # on CPU: every stage at tiny sizes, to know the script runs

The batch is random tensors shaped like the recipe's crops (no data loading: the data pipeline has its own
benchmark); every number is printed with the device it was measured on. ``--json FILE`` keeps the rows. On a machine
without the project's dependencies, install the package with ``pip install --no-deps -e .`` plus the pure-Python
wheels it imports (webdataset, braceexpand), carried along.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"ViL-S/16": REPO / "recipes" / "vil2_s16_dinov2_in1k.yaml",
           "ViT-S/16": REPO / "recipes" / "vit_s16_dinov2_in1k.yaml"}
# Step-based durations: the recipes count epochs of a dataset that this benchmark does not read.
SCHEDULE = ["schedule.total_steps=1000", "schedule.warmup_steps=10", "schedule.teacher_temp_warmup_steps=10",
            "schedule.freeze_last_layer_steps=1", "data.samples_per_epoch=null"]
TINY = ["model.dim=64", "model.depth=2", "data.augment.global_size=32", "data.augment.local_size=16",
        "data.augment.n_local=2", "objective.dino_head.out_dim=256", "objective.dino_head.hidden_dim=128",
        "objective.dino_head.bottleneck_dim=32", "objective.ibot_head.out_dim=256",
        "objective.ibot_head.hidden_dim=128", "objective.ibot_head.bottleneck_dim=32"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds per call of each fn, the rows alternating call by call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def ssl_step_fn(recipe: Path, overrides: list[str], batch: int, device: torch.device,
                compiled: bool) -> tuple[Callable[[], None], str]:
    """A closure running one full DINOv2 step of ``recipe`` on a fixed random multi-crop batch."""
    from ssl_vil.config import load_config
    from ssl_vil.infra.precision import autocast, resolve_precision
    from ssl_vil.masking import MultiCropMaskCollate
    from ssl_vil.train.build import build_optimizer, build_ssl_objective

    cfg = load_config(recipe, [*SCHEDULE, *overrides, f"optim.global_batch_size={batch}",
                               f"train.device={device.type}"], world_size=1)
    torch.manual_seed(0)
    objective = build_ssl_objective(cfg).to(device)
    optimizer = build_optimizer(cfg, objective.student)
    if compiled:  # the objective's forward then goes through the compiled student, as train.compile=true does
        objective.wrap_student(torch.compile)
    a = cfg.data.augment
    grid = a.global_size // cfg.model.patch_size
    collate = MultiCropMaskCollate.from_config((grid, grid), a.n_global, a.n_local, cfg.masking)
    gen = torch.Generator().manual_seed(0)
    samples = [{"key": f"s{i}", "label": 0,
                "views": [torch.randn(3, a.global_size, a.global_size, generator=gen) for _ in range(a.n_global)]
                + [torch.randn(3, a.local_size, a.local_size, generator=gen) for _ in range(a.n_local)]}
               for i in range(batch)]
    cpu_batch = collate(samples, torch.Generator().manual_seed(1))
    data = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in cpu_batch.items()}
    precision = resolve_precision(cfg.train.precision, device)

    def step() -> None:
        with autocast(precision, device):
            out = objective(data, teacher_temp=0.04)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.update_teacher(0.996)
        objective.commit_step()

    return step, f"{cfg.model.name} (dim {cfg.model.dim}, depth {cfg.model.depth}), {precision}"


def stage_ssl_step(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    overrides = TINY if args.dry_run else []
    for compiled in (False, True):
        fns, described = {}, {}
        for name, recipe in RECIPES.items():
            fns[name], described[name] = ssl_step_fn(recipe, overrides, args.batch, device, compiled)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = best_time(fns, device, args.repeats, args.warmup)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        for name in RECIPES:
            rows.append({"stage": "ssl-step", "model": name, "compile": compiled, "what": described[name],
                         "s_per_step": times[name], "img_per_s": args.batch / times[name], "peak_gib_both": peak})
    return rows


def stage_mlstm(args: argparse.Namespace, device: torch.device) -> list[dict]:
    from ssl_vil.backbones import mlstm_chunkwise, mlstm_parallel

    seqlen = 196 if args.dry_run else 3136
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    shape = (2, 4, seqlen)
    inputs = [torch.randn(*shape, 48, generator=gen) for _ in range(3)]
    inputs += [torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen) + 3.0]
    inputs = [t.to(device, dtype) for t in inputs]
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"
        tensors = [t.clone().requires_grad_(grad) for t in inputs]

        def call(kernel: Callable[..., torch.Tensor], tensors: list[torch.Tensor] = tensors,
                 grad: bool = grad) -> None:
            with contextlib.nullcontext() if grad else torch.no_grad():
                out = kernel(*tensors)
            if grad:
                out.float().sum().backward()

        times = best_time({"parallel": lambda: call(mlstm_parallel), "chunkwise": lambda: call(mlstm_chunkwise)},
                          device, args.repeats, args.warmup)
        for backend, t in times.items():
            rows.append({"stage": "mlstm", "model": backend, "mode": mode, "tokens": seqlen, "dtype": str(dtype),
                         "s_per_call": t})
    return rows


def print_tables(rows: list[dict], device_name: str) -> None:
    print(f"device: {device_name}")
    steps = [r for r in rows if r["stage"] == "ssl-step"]
    if steps:
        print("\nssl-step (one full DINOv2 step, random crops)")
        print(f"{'model':<10}{'compile':>8}{'s/step':>10}{'img/s':>10}  what")
        for r in steps:
            print(f"{r['model']:<10}{str(r['compile']):>8}{r['s_per_step']:>10.4f}{r['img_per_s']:>10.1f}  {r['what']}")
        for compiled in (False, True):
            by = {r["model"]: r for r in steps if r["compile"] == compiled}
            ratio = by["ViL-S/16"]["img_per_s"] / by["ViT-S/16"]["img_per_s"]
            print(f"ViL / ViT img/s, compile={compiled}: {ratio:.2f}  (goal on a GPU with compile: >= 0.8)")
    kernels = [r for r in rows if r["stage"] == "mlstm"]
    if kernels:
        print(f"\nmlstm kernels ({kernels[0]['tokens']} tokens, {kernels[0]['dtype']})")
        for mode in ("fwd", "fwd+bwd"):
            by = {r["model"]: r["s_per_call"] for r in kernels if r["mode"] == mode}
            print(f"{mode:<8} parallel {by['parallel'] * 1e3:9.2f} ms   chunkwise {by['chunkwise'] * 1e3:9.2f} ms   "
                  f"parallel / chunkwise {by['parallel'] / by['chunkwise']:.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: check that every stage runs")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 64 on a GPU, 4 dry-run)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default: 10 on a GPU, 2 dry-run)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3, 1 dry-run)")
    p.add_argument("--stages", nargs="+", default=["ssl-step", "mlstm"], choices=["ssl-step", "mlstm"])
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        p.error("no CUDA device; use --dry-run to check the script on CPU")
    args.batch = args.batch or (4 if args.dry_run else 64)
    args.repeats = args.repeats or (2 if args.dry_run else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows: list[dict] = []
    if "ssl-step" in args.stages:
        rows += stage_ssl_step(args, device)
    if "mlstm" in args.stages:
        rows += stage_mlstm(args, device)
    print_tables(rows, f"{name}, torch {torch.__version__}")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
