"""ViL-T backbone cost: official parallel mLSTM vs our chunkwise mLSTM, side by side.

For each input size (224 / 448 / 896 px = 196 / 784 / 3136 tokens) and mode (forward under no_grad, forward +
backward), both backends run in fresh child processes (so peak memory is measured per run) on the same seeded
model and input; the table gives median wall time, peak extra RSS of the measured call, and the ratios
parallel / chunkwise (> 1: chunkwise is faster / leaner). Model: ``vil2_tiny_patch16_224`` (dim 192, 12 block
pairs), batch 1, 2 threads. Forward + backward at 896 px runs a 1-pair ViL-T slice because the quadratic form
would need ~20 GB of saved S x S matrices for the full depth; the per-layer cost ratio is what it measures.

    python bench/backbone.py            # full run (several minutes on 2 cores)
    python bench/backbone.py --quick    # 224 / 448 px, 2-pair model, 1 repeat (~1 minute)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIZES_PX = (224, 448, 896)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) of this process; False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def child(px: int, mode: str, backend: str, depth: int, repeats: int, threads: int) -> dict:
    import gc

    import timm
    import torch

    import ssl_vil.backbones  # noqa: F401  (registers the models)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("vil2_tiny_patch16_224", img_size=px, depth=depth, mlstm_backend=backend)
    image = torch.randn(1, 3, px, px)

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                model(image)
        else:
            model.zero_grad(set_to_none=True)
            model(image).sum().backward()

    model.eval() if mode == "fwd" else model.train()
    with torch.no_grad():  # warm up kernels at a small size so that the measured peak is the call itself
        model(torch.randn(1, 3, 32, 32))
    gc.collect()
    baseline = _rss_bytes("VmRSS")
    hwm_reset = _reset_peak_rss()
    start = time.perf_counter()
    step()
    times = [time.perf_counter() - start]
    peak_extra = _rss_bytes("VmHWM") - baseline
    for _ in range(repeats - 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return dict(px=px, mode=mode, backend=backend, depth=depth, tokens=(px // 16) ** 2,
                median_s=times[len(times) // 2], min_s=times[0], times_s=times,
                peak_extra_mb=peak_extra / 2**20, hwm_reset=hwm_reset)


def run_child(**kwargs) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {kwargs} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="224/448 px, 2 block pairs, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write all measurements to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--px", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.px, args.mode, args.backend, args.depth, args.repeats, args.threads)))
        return

    sizes = SIZES_PX[:2] if args.quick else SIZES_PX
    repeats = 1 if args.quick else args.repeats
    rows = []
    print(f"ViL-T (vil2_tiny_patch16_224), batch 1, {args.threads} threads, median of {repeats}; "
          "ratio = parallel / chunkwise")
    header = (f"{'px':>4} {'tokens':>6} {'mode':>7} {'pairs':>5} | {'parallel s':>10} {'chunk s':>9} {'time x':>7} | "
              f"{'par MB':>8} {'chunk MB':>8} {'mem x':>6}")
    print(header)
    print("-" * len(header))
    for mode in ("fwd", "fwd+bwd"):
        for px in sizes:
            depth = 2 if args.quick else (1 if (mode == "fwd+bwd" and px >= 896) else 12)
            cell = {b: run_child(px=px, mode=mode, backend=b, depth=depth, repeats=repeats, threads=args.threads)
                    for b in ("parallel", "chunkwise")}
            par, chk = cell["parallel"], cell["chunkwise"]
            rows += [par, chk]
            print(f"{px:>4} {par['tokens']:>6} {mode:>7} {depth:>5} | {par['median_s']:>10.3f} {chk['median_s']:>9.3f} "
                  f"{par['median_s'] / chk['median_s']:>6.1f}x | {par['peak_extra_mb']:>8.0f} "
                  f"{chk['peak_extra_mb']:>8.0f} {par['peak_extra_mb'] / max(chk['peak_extra_mb'], 1):>5.1f}x", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
