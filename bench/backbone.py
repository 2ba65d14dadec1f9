"""ViL-T backbone cost: official parallel mLSTM vs our chunkwise mLSTM, side by side.

For each input size (224 / 448 / 896 px = 196 / 784 / 3136 tokens) and mode (forward under no_grad, forward +
backward), both backends run on the same seeded
model and input; the table gives the best-of-N wall time (backends alternate call by call in one process, so
both see the same machine load; the minimum is the estimate least disturbed by other processes on a shared
machine), peak extra RSS of one call (each in a fresh process), and the ratios
parallel / chunkwise (> 1: chunkwise is faster / leaner). Model: ``vil2_tiny_patch16_224`` (dim 192, 12 block
pairs), batch 1, 2 threads. Forward + backward at 896 px runs a 1-pair ViL-T slice because the quadratic form
would need ~20 GB of saved S x S matrices for the full depth; the per-layer cost ratio is what it measures.
A second table times the two mLSTM kernels alone (the spec's kernel-level setup).

    python bench/backbone.py            # full run (several minutes on 2 cores)
    python bench/backbone.py --quick    # 224 / 448 px, 2-pair model, 2 repeats (1-3 minutes)
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


def _build(px: int, depth: int, backend: str):
    import timm
    import torch

    import ssl_vil.backbones  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    model = timm.create_model("vil2_tiny_patch16_224", img_size=px, depth=depth, mlstm_backend=backend)
    return model, torch.randn(1, 3, px, px)


def _step(model, image, mode: str) -> None:
    import torch

    if mode == "fwd":
        with torch.no_grad():
            model(image)
    else:
        model.zero_grad(set_to_none=True)
        model(image).sum().backward()


def memory_child(px: int, mode: str, backend: str, depth: int, threads: int) -> dict:
    """Peak extra RSS of one call, in a fresh process (freed memory of earlier calls cannot hide it)."""
    import gc

    import torch

    torch.set_num_threads(threads)
    model, image = _build(px, depth, backend)
    model.eval() if mode == "fwd" else model.train()
    with torch.no_grad():  # initialise kernels at a small size first
        model(torch.randn(1, 3, 32, 32))
    gc.collect()
    baseline = _rss_bytes("VmRSS")
    hwm_reset = _reset_peak_rss()
    _step(model, image, mode)
    return dict(peak_extra_mb=(_rss_bytes("VmHWM") - baseline) / 2**20, hwm_reset=hwm_reset)


def timing_child(px: int, mode: str, depth: int, repeats: int, threads: int) -> dict:
    """Median wall time per backend; the backends alternate call by call so that both see the same load."""
    import torch

    torch.set_num_threads(threads)
    model, image = _build(px, depth, "parallel")
    model.eval() if mode == "fwd" else model.train()
    times: dict[str, list[float]] = {"parallel": [], "chunkwise": []}
    rounds = min(repeats, 3) if px >= 896 else repeats + 1
    for round_index in range(rounds):
        for backend in times:
            model.set_mlstm_backend(backend)
            start = time.perf_counter()
            _step(model, image, mode)
            elapsed = time.perf_counter() - start
            if px >= 896 or round_index > 0:  # the first round at small sizes is a warm-up
                times[backend].append(elapsed)
    return {b: min(t) for b, t in times.items()} | {"times_s": times}


def kernel_child(seqlen: int, repeats: int, threads: int) -> dict:
    """mLSTM kernels alone (spec section 8 setup: B=2, NH=4, DH=48, f ~ N(3, 1)), forward and forward+backward."""
    import torch

    from ssl_vil.backbones import mlstm_chunkwise, mlstm_parallel

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    shape = (2, 4, seqlen)
    inputs = [torch.randn(*shape, 48, generator=gen) for _ in range(3)]
    inputs += [torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen) + 3.0]
    kernels = {"parallel": mlstm_parallel, "chunkwise": mlstm_chunkwise}
    result = {}
    for mode in ("fwd", "fwd+bwd"):
        args = [t.clone().requires_grad_(mode == "fwd+bwd") for t in inputs]
        times: dict[str, list[float]] = {b: [] for b in kernels}
        for round_index in range(repeats + 1):
            for backend, kernel in kernels.items():
                start = time.perf_counter()
                if mode == "fwd":
                    with torch.no_grad():
                        kernel(*args)
                else:
                    kernel(*args).sum().backward()
                if round_index > 0:
                    times[backend].append(time.perf_counter() - start)
        result[mode] = {b: min(t) for b, t in times.items()}
    return result


def run_child(kind: str, **kwargs) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={kind}"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {kind} {kwargs} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="224/448 px, 2 block pairs, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell (best reported; max 3 at 896 px)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write all measurements to this JSON file")
    parser.add_argument("--child", choices=("memory", "timing", "kernel"), help=argparse.SUPPRESS)
    parser.add_argument("--seqlen", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--px", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "memory":
        print(json.dumps(memory_child(args.px, args.mode, args.backend, args.depth, args.threads)))
        return
    if args.child == "kernel":
        print(json.dumps(kernel_child(args.seqlen, args.repeats, args.threads)))
        return
    if args.child == "timing":
        print(json.dumps(timing_child(args.px, args.mode, args.depth, args.repeats, args.threads)))
        return

    sizes = SIZES_PX[:2] if args.quick else SIZES_PX
    repeats = 2 if args.quick else args.repeats
    rows = []
    print(f"ViL-T (vil2_tiny_patch16_224), batch 1, {args.threads} threads, best of {repeats}; "
          f"ratio = parallel / chunkwise; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    header = (f"{'px':>4} {'tokens':>6} {'mode':>7} {'pairs':>5} | {'parallel s':>10} {'chunk s':>9} {'time x':>7} | "
              f"{'par MB':>8} {'chunk MB':>8} {'mem x':>6}")
    print(header)
    print("-" * len(header))
    for mode in ("fwd", "fwd+bwd"):
        for px in sizes:
            depth = 2 if args.quick else (1 if (mode == "fwd+bwd" and px >= 896) else 12)
            timing = run_child("timing", px=px, mode=mode, depth=depth, repeats=repeats, threads=args.threads)
            memory = {b: run_child("memory", px=px, mode=mode, backend=b, depth=depth, threads=args.threads)
                      for b in ("parallel", "chunkwise")}
            par_s, chk_s = timing["parallel"], timing["chunkwise"]
            par_mb, chk_mb = memory["parallel"]["peak_extra_mb"], memory["chunkwise"]["peak_extra_mb"]
            rows.append(dict(px=px, tokens=(px // 16) ** 2, mode=mode, pairs=depth, timing=timing, memory=memory))
            print(f"{px:>4} {(px // 16) ** 2:>6} {mode:>7} {depth:>5} | {par_s:>10.3f} {chk_s:>9.3f} "
                  f"{par_s / chk_s:>6.1f}x | {par_mb:>8.0f} {chk_mb:>8.0f} {par_mb / max(chk_mb, 1):>5.1f}x",
                  flush=True)
    print(f"\nmLSTM kernel alone (B=2, NH=4, DH=48), best of {repeats}; ratio = parallel / chunkwise")
    header = (f"{'tokens':>6} | {'fwd par ms':>10} {'fwd chunk ms':>12} {'x':>6} | {'fwbw par ms':>11} "
              f"{'fwbw chunk ms':>13} {'x':>6}")
    print(header)
    print("-" * len(header))
    for px in sizes:
        seqlen = (px // 16) ** 2
        kernel = run_child("kernel", seqlen=seqlen, repeats=repeats, threads=args.threads)
        rows.append(dict(kernel_tokens=seqlen, **kernel))
        fwd, fwbw = kernel["fwd"], kernel["fwd+bwd"]
        print(f"{seqlen:>6} | {fwd['parallel'] * 1e3:>10.1f} {fwd['chunkwise'] * 1e3:>12.1f} "
              f"{fwd['parallel'] / fwd['chunkwise']:>5.1f}x | {fwbw['parallel'] * 1e3:>11.1f} "
              f"{fwbw['chunkwise'] * 1e3:>13.1f} {fwbw['parallel'] / fwbw['chunkwise']:>5.1f}x", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
