"""Dense-prediction cost of the backbones: forward + backward time and peak memory versus input size.

Dense heads (segmentation, detection) run backbones on large images, where a ViT's attention grows quadratically in
the number of tokens and ViL's chunkwise mLSTM linearly. For each model and input size (square, batch 1) the table
gives the median wall time of one backbone forward + backward (``forward_features(x).float().square().mean()``)
over ``--repeats`` calls after one warm-up call, its CPU time (process time: with one thread the work done, which
other processes on a shared machine disturb less than the wall time), and the peak memory of one call. Each
(model, size) cell runs in a fresh process, so the freed memory of earlier cells cannot hide a peak; the cells run
size by size, the models alternating, so that every model sees the same machine load. Below the table: each
model's growth exponent, the slope of log(time) against log(tokens) fitted over all sizes, and the two-point
exponent from the smallest to the largest size (1: linear in the tokens, 2: quadratic), of the wall time and of the
CPU time.

Memory: on CPU the peak RSS of the call above the process's RSS before it (the model and its input already built:
activations, gradients, workspace), read from the kernel's high-water mark (``VmHWM`` after resetting it, or
``ru_maxrss`` where the kernel refuses the reset); on CUDA ``torch.cuda.max_memory_allocated`` of the call (bf16
autocast, weights fp32). CPU runs are fp32.

Models: ``vil2_t`` = ``vil2_tiny_patch16_224`` (mlstm_backend="chunkwise"), ``vit_s`` / ``vit_t`` =
``vit_{small,tiny}_patch16_224`` as ``MaskedViT`` (timm's ViT with ``dynamic_img_size=True``, fused attention).

    python bench/dense.py                                   # 256..1024 px, the three models, median of 3
    python bench/dense.py --sizes 256 512 --models vil2_t --repeats 5 --json out.json
    python bench/dense.py --quick                           # 64 / 128 px, tiny dims: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts, run or loaded by path
from backbone import _reset_peak_rss  # noqa: E402

SIZES_PX = (256, 384, 512, 768, 1024)
QUICK_SIZES_PX = (64, 128)
PATCH = 16
# key -> (label, timm name, constructor kwargs, tiny-dims kwargs of --quick)
MODELS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "vil2_t": ("ViL-T v2", "vil2_tiny_patch16_224", dict(mlstm_backend="chunkwise"), dict(dim=64, depth=2)),
    "vit_s": ("ViT-S/16", "vit_small_patch16_224", {}, dict(embed_dim=64, depth=2, num_heads=2)),
    "vit_t": ("ViT-T/16", "vit_tiny_patch16_224", {}, dict(embed_dim=64, depth=2, num_heads=2)),
}


# ------------------------------------------------------------------------------------------------ child side
def _status_bytes(field: str) -> int | None:
    """``field`` ("VmRSS", "VmHWM") of /proc/self/status in bytes; None where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _max_rss_bytes() -> int:
    """Peak RSS of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_model(key: str, px: int, quick: bool):
    """The backbone of ``key`` (no classifier) built for ``px`` px inputs, in train mode."""
    import timm

    import ssl_vil  # noqa: F401  (registers the ViL models)
    from ssl_vil.backbones.vit_adapter import create_vit_backbone

    _, name, kwargs, tiny = MODELS[key]
    kwargs = {**kwargs, **(tiny if quick else {}), "img_size": px, "num_classes": 0}
    if name.startswith("vil"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        model = create_vit_backbone(name, **kwargs)
    return model.train()


def measure_cell(key: str, px: int, repeats: int, threads: int, quick: bool, device: str) -> dict[str, Any]:
    """Time and peak memory of forward + backward of ``key`` on one (1, 3, px, px) image, in this process."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(key, px, quick).to(dev)
    image = torch.randn(1, 3, px, px, device=dev)
    cuda = dev.type == "cuda"

    def step() -> int:
        model.zero_grad(set_to_none=True)  # every call allocates its gradients: the same peak each time
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            tokens = model.forward_features(image)  # (1, [prefix +] S, d)
        tokens.float().square().mean().backward()
        return int(tokens.shape[1])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        import gc

        gc.collect()
        base = _status_bytes("VmRSS") or _max_rss_bytes()
        hwm_reset = _reset_peak_rss()
    seq_len = step()  # warm-up; the memory peak is the same in every call
    sync()
    if cuda:
        peak_extra = torch.cuda.max_memory_allocated(dev) - base
        memory_source = "cuda max_memory_allocated"
    else:
        hwm = _status_bytes("VmHWM") if hwm_reset else None
        peak = hwm if hwm is not None else _max_rss_bytes()
        peak_extra = peak - base
        memory_source = "VmHWM" if hwm is not None else "ru_maxrss"
    times, cpu_times = [], []
    for _ in range(repeats):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return dict(model=key, px=px, seq_len=seq_len, times_s=times, median_s=statistics.median(times),
                cpu_times_s=cpu_times, median_cpu_s=statistics.median(cpu_times),
                peak_mb=peak_extra / 2**20, process_peak_mb=_max_rss_bytes() / 2**20, memory=memory_source,
                threads=threads, device=device)


# ----------------------------------------------------------------------------------------------- parent side
def grid_tokens(px: int) -> int:
    """Patch tokens of a px x px input with 16 px patches: the map positions of every model here."""
    return (px // PATCH) ** 2


def growth_exponents(tokens: list[int], times: list[float]) -> tuple[float, float]:
    """(least-squares slope of log(time) on log(tokens) over all points, two-point slope first -> last)."""
    if len(tokens) < 2 or len(set(tokens)) < 2:
        return math.nan, math.nan
    xs, ys = [math.log(t) for t in tokens], [math.log(t) for t in times]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    fit = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return fit, (ys[-1] - ys[0]) / (xs[-1] - xs[0])


def run_cell(key: str, px: int, repeats: int, threads: int, quick: bool, device: str) -> dict[str, Any]:
    """``measure_cell`` in a fresh Python process; its result as a dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", key, "--px", str(px), "--repeats", str(repeats),
           "--threads", str(threads), "--device", device] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark cell {key} at {px} px failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict[str, Any]], memory_label: str) -> str:
    lines = [f"| model | input | tokens | ms per fwd+bwd | CPU ms | {memory_label} |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {MODELS[row['model']][0]} | {row['px']} px | {row['tokens']} | {row['median_s'] * 1e3:.0f} "
                     f"| {row['median_cpu_s'] * 1e3:.0f} | {row['peak_mb']:.0f} |")
    return "\n".join(lines)


def exponent_table(rows: list[dict[str, Any]]) -> tuple[str, dict[str, dict[str, float]]]:
    """Markdown table of each model's growth exponents (of the wall time, and of the CPU time, which other
    processes on a shared machine disturb less), and the exponents by model key."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    result = {}
    lines = ["| model | exponent (fit, all sizes) | exponent (two-point) | time ratio | token ratio "
             "| CPU-time exponent (fit / two-point) |", "|---|---|---|---|---|---|"]
    for key, cells in by_model.items():
        cells = sorted(cells, key=lambda r: r["px"])
        tokens = [c["tokens"] for c in cells]
        fit, two_point = growth_exponents(tokens, [c["median_s"] for c in cells])
        cpu_fit, cpu_two_point = growth_exponents(tokens, [c["median_cpu_s"] for c in cells])
        first, last = cells[0], cells[-1]
        result[key] = dict(fit=fit, two_point=two_point, cpu_fit=cpu_fit, cpu_two_point=cpu_two_point,
                           from_px=first["px"], to_px=last["px"])
        lines.append(f"| {MODELS[key][0]} | {fit:.2f} | {two_point:.2f} ({first['px']} -> {last['px']} px) "
                     f"| {last['median_s'] / first['median_s']:.1f}x | {last['tokens'] / first['tokens']:.0f}x "
                     f"| {cpu_fit:.2f} / {cpu_two_point:.2f} |")
    return "\n".join(lines), result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help=f"input sizes in px (default {list(SIZES_PX)})")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell after one warm-up (median)")
    # One thread by default: on a shared, loaded 2-core machine two torch threads oversubscribe the cores and
    # a step takes 2-3x longer and varies more (ViL-T at 256 px: 0.42 s with 1 thread, 0.9-7 s with 2).
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell (default 1)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--json", help="also write the rows and exponents to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help=f"sizes {list(QUICK_SIZES_PX)}, 2-block 64-dim models, 1 repeat: a smoke test")
    parser.add_argument("--child", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--px", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be positive")
    sizes = args.sizes or (QUICK_SIZES_PX if args.quick else SIZES_PX)
    bad = [px for px in sizes if px < PATCH or px % PATCH]
    if bad:
        parser.error(f"--sizes must be positive multiples of the patch size {PATCH} px, got {bad}")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(measure_cell(args.child, args.px, args.repeats, args.threads, args.quick, device)))
        return None

    repeats = 1 if args.quick and args.repeats == parser.get_default("repeats") else args.repeats
    memory_label = "peak MB (CUDA allocated)" if device.startswith("cuda") else "peak MB (RSS above the built model)"
    quick_note = "; --quick: tiny dims, not a measurement" if args.quick else ""
    print(f"backbone forward + backward, batch 1, {'bf16 autocast' if device.startswith('cuda') else 'fp32'} "
          f"on {device}, {args.threads} threads, median of {repeats} after 1 warm-up; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start{quick_note}", flush=True)
    rows = []
    for px in sizes:  # size by size, the models alternating: all see the same machine load
        for key in args.models:
            cell = run_cell(key, px, repeats, args.threads, args.quick, device)
            cell["tokens"] = grid_tokens(px)
            rows.append(cell)
            print(f"  {MODELS[key][0]:<9} {px:>5} px {cell['tokens']:>6} tokens {cell['median_s'] * 1e3:>9.0f} ms "
                  f"(CPU {cell['median_cpu_s'] * 1e3:.0f} ms) {cell['peak_mb']:>8.0f} MB", flush=True)
    rows.sort(key=lambda r: (args.models.index(r["model"]), r["px"]))
    exponents_md, exponents = exponent_table(rows)
    print()
    print(markdown_table(rows, memory_label))
    print()
    print("Growth exponent of time in tokens (1 = linear, 2 = quadratic):")
    print()
    print(exponents_md)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    result = dict(device=device, threads=args.threads, repeats=repeats, quick=args.quick, rows=rows,
                  exponents=exponents)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    return result


if __name__ == "__main__":
    main()
