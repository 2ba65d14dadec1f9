"""One GPU check: the gpu-marked tests, ViL-S against ViT-S under the same DINOv2 step, the mLSTM kernels, ViL-T over
input resolution and the k-NN search.

Stages (timed rows alternate call by call, best-of-N after warm-up; every row names the device it ran on):

1. ``tests``: ``pytest -m gpu tests/test_gpu.py`` in a subprocess with a timeout (bf16 autocast of a DINOv2 step,
   ``torch.compile`` vs eager, the Triton mLSTM kernels vs our chunkwise form, faiss-gpu vs torch). Rows: the
   passed / failed / error / skipped counts, then one row per test.
2. ``ssl-step``: one full self-distillation step of recipes/vil2_s16_dinov2_in1k.yaml and of
   recipes/vit_s16_dinov2_in1k.yaml (the same recipe with the backbone changed) at the recipes' real sizes:
   K = 65536 prototypes (DINO and iBOT heads), 2 x 224 px + 8 x 96 px crops, 64 images per GPU (on a CUDA
   out-of-memory the batch is halved and the group retried; rows give the batch used). Student forward on all
   crops, teacher forward, DINO + iBOT + KoLeo losses, backward, AdamW, EMA, in the run's precision (bf16 autocast
   on GPU). Rows: both models eager and with ``torch.compile`` of the student (as ``train.compile=true`` does),
   ViL-S eager per mLSTM backend (``model.mlstm_backend=parallel / chunkwise / mlstm_kernels``, the last when
   importable), and a data-wait row: ViL-S steps fed by an iterator that copies a pre-collated batch from pinned
   memory (``non_blocking``), with ``time.perf_counter`` around each fetch. Columns: s/step, img/s, peak memory;
   the ViL / ViT img/s ratio (goal on a GPU: >= 0.8 with compile on).
3. ``mlstm``: the mLSTM kernels alone, ``parallel``, ``chunkwise`` and ``mlstm_kernels`` (when importable), forward
   and forward + backward, at 3136 tokens (the spec's kernel setup: B=2, NH=4, DH=48), in the run's precision.
4. ``resolution``: ViL-T (``vil2_tiny_patch16_224``) forward + backward, batch 8, at 224 / 448 / 896 px (196 / 784 /
   3136 tokens) per mLSTM backend: time and peak memory against tokens, to show the linear growth of the chunkwise
   kernels (the quadratic parallel form may run out of memory at 896 px: reported as OOM).
5. ``knn``: the project's torch k-NN (``ssl_vil.eval.knn_search``): the neighbour search and the whole
   classification (k = 10, 20, 100, 200), 10k queries against 100k train features of dim 384 (and faiss-gpu's
   search beside it when a GPU faiss build imports).

    python bench/gpu_check.py --json gpu_check.json   # on a GPU machine: the real sizes, under 8 minutes
    python bench/gpu_check.py --dry-run               # on CPU: every stage at tiny sizes, to know the script runs

On the GPU machine (its own Python with torch + CUDA, timm, tensorboard and safetensors, no package index), after
``make gpu-wheels`` here has filled ``gpu-wheels/`` with the pure-Python wheels it lacks (pytest and its
dependencies, pytest-timeout, mlstm-kernels, einops, webdataset, braceexpand, setuptools; the Makefile lists why),
copy the checkout with ``gpu-wheels/`` (git ignores it, so name it among the paths to carry) and run from the
repository root:

    pip install --no-index --no-deps gpu-wheels/*.whl && pip install --no-index --no-deps --no-build-isolation -e .
    python bench/gpu_check.py --json $OUT/gpu_check.json

(``--no-index --no-build-isolation``: without an index, pip cannot fetch the build backend into an isolated
environment; it uses the setuptools wheel just installed. The script also runs without the editable install: it
puts the repository on ``sys.path``, as pytest's ``pythonpath`` does for the tests.) Nothing on this script's
import path needs numba, scikit-learn or webdataset: its imports stay within torch, timm, their dependencies
and those wheels (tests/test_bench_gpu_check.py runs the dry run with the others made unimportable).

The batches are random tensors shaped like the recipe's crops (no decoding: the data pipeline has its own
benchmark, bench/data_pipeline.py). ``--json FILE`` keeps the rows, rewritten after every stage, so a run cut short
still leaves the stages it finished. ``--budget-s`` (default 450) bounds the whole run: a stage or row group that
would run past it is stopped and reported as skipped, so the script ends inside its 8 minutes.
"""

from __future__ import annotations

import time

START = time.monotonic()  # before the heavy imports: the time budget counts the interpreter's start-up too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .` (the GPU machine may lack it)
    sys.path.insert(0, str(REPO))

STAGES = ("tests", "ssl-step", "mlstm", "resolution", "knn")  # the order of the printed tables
# The order they run in: cheap first, the torch.compile of two full DINOv2 steps last, so that a run stopped by its
# time budget loses the least.
RUN_ORDER = ("tests", "mlstm", "knn", "resolution", "ssl-step")
RECIPES = {"ViL-S/16": REPO / "recipes" / "vil2_s16_dinov2_in1k.yaml",
           "ViT-S/16": REPO / "recipes" / "vit_s16_dinov2_in1k.yaml"}
# Step-based durations: the recipes count epochs of a dataset that this benchmark does not read.
SCHEDULE = ["schedule.total_steps=1000", "schedule.warmup_steps=10", "schedule.teacher_temp_warmup_steps=10",
            "schedule.freeze_last_layer_steps=1", "data.samples_per_epoch=null"]
TINY = ["model.dim=64", "model.depth=2", "data.augment.global_size=32", "data.augment.local_size=16",
        "data.augment.n_local=2", "objective.dino_head.out_dim=256", "objective.dino_head.hidden_dim=128",
        "objective.dino_head.bottleneck_dim=32", "objective.ibot_head.out_dim=256",
        "objective.ibot_head.hidden_dim=128", "objective.ibot_head.bottleneck_dim=32"]
# What "real size" means for the ssl-step stage (the recipes' values; checked, so a recipe edit cannot shrink it).
REAL_PROTOTYPES, REAL_CROPS = 65536, (2, 224, 8, 96)
MLSTM_BACKENDS = ("parallel", "chunkwise", "mlstm_kernels")
RES_MODEL = "vil2_tiny_patch16_224"
KNN_KS = (10, 20, 100, 200)


class BudgetExceeded(BaseException):
    """The run's time budget ran out inside a stage. A BaseException, like KeyboardInterrupt: torch.compile turns
    ordinary exceptions raised while it traces into its own errors (or falls back to eager), never this one."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise BudgetExceeded in the main thread after ``seconds`` (SIGALRM timer; a CUDA call in flight finishes
    first, then Python raises). Not nestable: the one process-wide timer is cleared on exit."""
    if seconds <= 0:
        raise BudgetExceeded

    def expire(signum: int, frame: Any) -> None:
        raise BudgetExceeded

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def seconds_left(args: argparse.Namespace) -> float:
    return args.budget_s - (time.monotonic() - START)


def log(message: str) -> None:
    """Progress on stderr: stdout holds only the tables."""
    print(f"[gpu_check {time.monotonic() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what dropped objects held: compiled graphs keep their modules alive until dynamo is reset."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def first_call_peaks(fns: dict[str, Callable[[], None]], device: torch.device) -> dict[str, float | None]:
    """One call of each fn (the first warm-up call) with its own peak memory in GiB (None off CUDA). The peak
    includes what every fn of the group keeps resident (weights, optimizer state), not only this call's work."""
    peaks: dict[str, float | None] = {}
    for name, fn in fns.items():
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return peaks


def kernels_importable(device: torch.device) -> bool:
    """Whether the ``mlstm_kernels`` backend runs here (the package, and Triton on CUDA)."""
    from ssl_vil.backbones.kernels_form import kernels_available

    return kernels_available(device.type)


# --- tests ---------------------------------------------------------------------------------------------------------


def stage_tests(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """``pytest -m gpu tests/test_gpu.py`` in a subprocess (on CPU every test skips); counts from its JUnit XML."""
    timeout = min(args.tests_timeout_s, max(seconds_left(args) - 5, 1))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}"]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            status, tail = f"exit {proc.returncode}", (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired as exc:  # its output is bytes whatever text= says
            out = exc.stdout or b""
            status, tail = f"timeout after {timeout:.0f} s", (out.decode(errors="replace") if isinstance(out, bytes)
                                                              else out)[-2000:]
        seconds = time.perf_counter() - start
        summary: dict[str, Any] = {"stage": "tests", "kind": "summary", "model": "pytest -m gpu tests/test_gpu.py",
                                   "status": status, "seconds": seconds}
        if not report.is_file():  # pytest missing, collection crashed or killed by the timeout
            log(f"tests: no report ({status}):\n{tail}")
            return [{**summary, "passed": 0, "failed": 0, "errors": 1, "skipped": 0, "message": tail[-500:]}]
        cases = [case_row(case) for case in ET.parse(report).getroot().iter("testcase")]
    counts = {outcome: sum(r["outcome"] == outcome for r in cases) for outcome in ("passed", "failed", "skipped")}
    counts["errors"] = sum(r["outcome"] == "error" for r in cases)
    if counts["failed"] or counts["errors"]:
        log(f"tests: failures:\n{tail}")
    return [{**summary, **counts}, *cases]


def case_row(case: ET.Element) -> dict:
    """One JUnit <testcase> as a row: outcome, seconds, and the skip reason or the failure's first line."""
    outcome, message = "passed", ""
    for child, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
        found = case.find(child)
        if found is not None:
            outcome, message = name, ((found.get("message") or "").splitlines() or [""])[0][:200]
            break
    return {"stage": "tests", "kind": "test", "model": case.get("name", "?"), "outcome": outcome,
            "seconds": float(case.get("time") or 0.0), "message": message}


# --- ssl-step ------------------------------------------------------------------------------------------------------


@dataclass
class SSLStep:
    """One recipe's objective and optimizer, ready to step on a fixed multi-crop batch (or on one it is given)."""

    run: Callable[[dict[str, Any]], None]
    cpu_batch: dict[str, Any]  # as the collate returns it
    data: dict[str, Any]  # the same, on the device
    what: str

    def __call__(self) -> None:
        self.run(self.data)


def check_real_size(cfg: Any) -> None:
    """The ssl-step stage measures the recipes as they train: fail loudly if they were edited below that."""
    a = cfg.data.augment
    found = (cfg.objective.dino_head.out_dim, cfg.objective.ibot_head.out_dim,
             (a.n_global, a.global_size, a.n_local, a.local_size))
    if found != (REAL_PROTOTYPES, REAL_PROTOTYPES, REAL_CROPS):
        raise ValueError(f"ssl-step expects K={REAL_PROTOTYPES} (DINO, iBOT) and crops (n_global, size, n_local, "
                         f"size)={REAL_CROPS}; the recipe gives {found}")


def build_ssl_step(recipe: Path, overrides: list[str], batch: int, device: torch.device, compiled: bool,
                   real_size: bool) -> SSLStep:
    """One full DINOv2 step of ``recipe`` on a fixed random multi-crop batch of ``batch`` images."""
    from ssl_vil.config import load_config
    from ssl_vil.infra.precision import autocast, resolve_precision
    from ssl_vil.train.build import build_optimizer, build_ssl_objective

    cfg = load_config(recipe, [*SCHEDULE, *overrides, f"optim.global_batch_size={batch}",
                               f"train.device={device.type}"], world_size=1)
    if real_size:
        check_real_size(cfg)
    torch.manual_seed(0)
    objective = build_ssl_objective(cfg).to(device)
    optimizer = build_optimizer(cfg, objective.student)
    if compiled:  # the objective's forward then goes through the compiled student, as train.compile=true does
        objective.wrap_student(torch.compile)
    a = cfg.data.augment
    cpu_batch = random_multicrop_batch(cfg, batch)
    data = to_device(cpu_batch, device)
    precision = resolve_precision(cfg.train.precision, device)

    def step(data: dict[str, Any]) -> None:
        with autocast(precision, device):
            out = objective(data, teacher_temp=0.04)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.update_teacher(0.996)
        objective.commit_step()

    vil = cfg.model.name.startswith("vil")
    what = (f"{cfg.model.name} (dim {cfg.model.dim}, depth {cfg.model.depth}"
            f"{', mlstm ' + cfg.model.mlstm_backend if vil else ''}), K={cfg.objective.dino_head.out_dim}, "
            f"{a.n_global}x{a.global_size}+{a.n_local}x{a.local_size} px, {precision}")
    return SSLStep(step, cpu_batch, data, what)


def random_multicrop_batch(cfg: Any, batch: int) -> dict[str, Any]:
    """``batch`` samples of random crops shaped like the run's multi-crop views, through the run's own collate
    (iBOT masks included), on the CPU; seeded, so every call gives the same batch."""
    from ssl_vil.train.data import multicrop_collate

    a = cfg.data.augment
    gen = torch.Generator().manual_seed(0)
    samples = [{"key": f"s{i}", "label": 0,
                "views": [torch.randn(3, a.global_size, a.global_size, generator=gen) for _ in range(a.n_global)]
                + [torch.randn(3, a.local_size, a.local_size, generator=gen) for _ in range(a.n_local)]}
               for i in range(batch)]
    return multicrop_collate(cfg)(samples, torch.Generator().manual_seed(1))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def device_batches(cpu_batch: dict[str, Any], device: torch.device) -> Iterator[dict[str, Any]]:
    """An endless loader stand-in: the collated batch in pinned memory, copied to the device on every fetch
    (``non_blocking``, as a DataLoader with ``pin_memory=True`` feeds the training loop)."""
    pinned = {k: v.pin_memory() if isinstance(v, torch.Tensor) and device.type == "cuda" else v
              for k, v in cpu_batch.items()}
    while True:
        yield to_device(pinned, device)


def timed_group(builders: dict[str, Callable[[int], SSLStep]], batch: int, device: torch.device,
                args: argparse.Namespace) -> tuple[int, dict[str, SSLStep], dict[str, float], dict[str, float | None]]:
    """Build every step of a row group at ``batch`` and time them side by side; on a CUDA out-of-memory halve the
    batch and retry the whole group (its rows must share one batch to compare). Returns the batch used, the steps,
    best seconds per step and first-call peak GiB."""
    while True:
        steps: dict[str, SSLStep] | None = None
        oom = False
        try:
            steps = {name: build(batch) for name, build in builders.items()}
            peaks = first_call_peaks(steps, device)  # also the first warm-up call (the compile, when compiled)
            times = best_time(steps, device, args.repeats, max(args.warmup - 1, 0))
            return batch, steps, times, peaks
        except torch.cuda.OutOfMemoryError:
            oom = True  # handled below, once the exception (and the tensors its frames hold) is gone
        if oom:
            steps = None
            release(device)
            if batch == 1:
                raise RuntimeError("ssl-step: out of memory at batch 1")
            log(f"ssl-step: out of memory at batch {batch}; retrying at {batch // 2}")
            batch //= 2


def data_wait_row(step: SSLStep, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Steps fed from ``device_batches``: the fraction of step time the host spends fetching the next batch. Its
    s/step is the mean over the timed steps, not a best-of: the fraction is a ratio of sums."""
    batches = device_batches(step.cpu_batch, device)
    for _ in range(args.warmup):
        step.run(next(batches))
    sync(device)
    fetch = 0.0
    start = time.perf_counter()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        data = next(batches)
        fetch += time.perf_counter() - t0
        step.run(data)
    sync(device)
    total = time.perf_counter() - start
    return {"s_per_step": total / args.repeats, "fetch_s_per_step": fetch / args.repeats,
            "data_wait_frac": fetch / total}


def stage_ssl_step(args: argparse.Namespace, device: torch.device) -> list[dict]:
    overrides = TINY if args.dry_run else []
    real = not args.dry_run
    rows: list[dict] = []
    batch = args.batch

    def step_row(name: str, kind: str, compiled: bool, backend: str, batch: int, step: SSLStep, t: float,
                 peak: float | None) -> dict:
        return {"stage": "ssl-step", "kind": kind, "model": name, "compile": compiled, "backend": backend,
                "batch": batch, "what": step.what, "s_per_step": t, "img_per_s": batch / t, "peak_gib": peak}

    def builders_for(compiled: bool) -> dict[str, Callable[[int], SSLStep]]:
        return {name: functools.partial(build_ssl_step, recipe, overrides, device=device, compiled=compiled,
                                        real_size=real) for name, recipe in RECIPES.items()}

    def eager() -> None:
        nonlocal batch
        batch, steps, times, peaks = timed_group(builders_for(False), batch, device, args)
        rows.extend(step_row(n, "step", False, "auto", batch, steps[n], times[n], peaks[n]) for n in steps)
        log(f"ssl-step: eager at batch {batch}; data wait")
        # On the ViL-S step just timed (same batch): the same work, its batch now fetched through a loader stand-in.
        wait = data_wait_row(steps["ViL-S/16"], device, args)
        rows.append({**step_row("ViL-S/16", "data-wait", False, "auto", batch, steps["ViL-S/16"], wait["s_per_step"],
                                None), **wait})

    def backends() -> None:
        nonlocal batch
        names = [b for b in MLSTM_BACKENDS if b != "mlstm_kernels" or kernels_importable(device)]
        recipe = RECIPES["ViL-S/16"]
        builders = {b: functools.partial(build_ssl_step, recipe, [*overrides, f"model.mlstm_backend={b}"],
                                         device=device, compiled=False, real_size=real) for b in names}
        batch, steps, times, peaks = timed_group(builders, batch, device, args)
        rows.extend(step_row("ViL-S/16", "backend", False, b, batch, steps[b], times[b], peaks[b]) for b in steps)

    def compiled() -> None:
        nonlocal batch
        batch, steps, times, peaks = timed_group(builders_for(True), batch, device, args)
        rows.extend(step_row(n, "step", True, "auto", batch, steps[n], times[n], peaks[n]) for n in steps)

    # Groups in order of cost, each under what is left of the budget, so a slow compile cannot eat the run (main
    # leaves this stage's budget to it: SIGALRM timers do not nest).
    for group, run in (("eager", eager), ("backends", backends), ("compile", compiled)):
        log(f"ssl-step: {group}")
        try:
            with time_limit(seconds_left(args)):
                run()
        except BudgetExceeded:
            rows.append({"stage": "ssl-step", "kind": "skipped", "model": group, "status": "skipped: time budget"})
        release(device)
    return rows


# --- mlstm ---------------------------------------------------------------------------------------------------------


def stage_mlstm(args: argparse.Namespace, device: torch.device) -> list[dict]:
    from ssl_vil.backbones import mlstm_chunkwise, mlstm_parallel
    from ssl_vil.backbones.kernels_form import mlstm_kernels_form

    seqlen = 196 if args.dry_run else 3136
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    shape = (2, 4, seqlen)
    inputs = [torch.randn(*shape, 48, generator=gen) for _ in range(3)]
    inputs += [torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen) + 3.0]
    inputs = [t.to(device, dtype) for t in inputs]
    kernels: dict[str, Callable[..., torch.Tensor]] = {"parallel": mlstm_parallel, "chunkwise": mlstm_chunkwise}
    if kernels_importable(device):
        kernels["mlstm_kernels"] = mlstm_kernels_form
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

        times = best_time({name: functools.partial(call, fn) for name, fn in kernels.items()},
                          device, args.repeats, args.warmup)
        for backend, t in times.items():
            rows.append({"stage": "mlstm", "model": backend, "mode": mode, "tokens": seqlen, "dtype": str(dtype),
                         "s_per_call": t})
    return rows


# --- resolution ----------------------------------------------------------------------------------------------------


def stage_resolution(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """ViL-T forward + backward per input size and mLSTM backend: tokens against time and peak memory."""
    import timm

    import ssl_vil.backbones  # noqa: F401  (registers the timm models)
    from ssl_vil.infra.precision import autocast, resolve_precision

    sizes = (32, 64, 128) if args.dry_run else (224, 448, 896)
    shape_kw: dict[str, Any] = {"dim": 64, "depth": 2} if args.dry_run else {}
    batch = 2 if args.dry_run else 8
    precision = resolve_precision("auto", device)
    backends = [b for b in MLSTM_BACKENDS if b != "mlstm_kernels" or kernels_importable(device)]
    rows: list[dict] = []
    for px in sizes:
        torch.manual_seed(0)
        model = timm.create_model(RES_MODEL, img_size=px, num_classes=0, **shape_kw).to(device).train()
        x = torch.randn(batch, 3, px, px, device=device)
        tokens = model.grid_size((px, px))[0] * model.grid_size((px, px))[1]

        def call(backend: str, model: torch.nn.Module = model, x: torch.Tensor = x) -> None:
            model.set_mlstm_backend(backend)
            with autocast(precision, device):
                out = model.forward_features(x)
            out.float().mean().backward()
            model.zero_grad(set_to_none=True)

        fns = {b: functools.partial(call, b) for b in backends}
        peaks: dict[str, float | None] = {}
        for b in backends:  # one call each, alone: its peak memory, or its OOM without taking the others down
            oom = False
            try:
                peaks.update(first_call_peaks({b: fns[b]}, device))
            except torch.cuda.OutOfMemoryError:
                oom = True
            if oom:
                model.zero_grad(set_to_none=True)
                release(device)
                fns.pop(b)
                rows.append({"stage": "resolution", "model": "ViL-T/16", "backend": b, "px": px, "tokens": tokens,
                             "batch": batch, "precision": precision, "s_per_call": None, "peak_gib": None,
                             "status": "OOM"})
        times = best_time(fns, device, args.repeats, max(args.warmup - 1, 0))
        for b, t in times.items():
            rows.append({"stage": "resolution", "model": "ViL-T/16", "backend": b, "px": px, "tokens": tokens,
                         "batch": batch, "precision": precision, "s_per_call": t, "peak_gib": peaks[b],
                         "status": "ok"})
        del model, x, fns
        release(device)
    order = {b: i for i, b in enumerate(backends)}
    return sorted(rows, key=lambda r: (r["px"], order[r["backend"]]))


# --- knn -----------------------------------------------------------------------------------------------------------


def stage_knn(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The project's torch k-NN on the device: the search alone and the whole top-1/top-5 classification."""
    import torch.nn.functional as F

    from ssl_vil.eval.knn_search import faiss_gpu_available, knn_classify, search_faiss, search_torch

    n_train, n_query, dim, classes = (1000, 100, 16, 10) if args.dry_run else (100_000, 10_000, 384, 1000)
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(n_train, dim, generator=gen), dim=1).to(device)
    queries = F.normalize(torch.randn(n_query, dim, generator=gen), dim=1).to(device)
    bank_labels = torch.randint(0, classes, (n_train,), generator=gen).to(device)
    query_labels = torch.randint(0, classes, (n_query,), generator=gen).to(device)
    k = max(KNN_KS)
    fns: dict[str, Callable[[], Any]] = {
        f"search_torch k={k}": lambda: search_torch(queries, bank, k),
        f"knn_classify k={','.join(map(str, KNN_KS))}": lambda: knn_classify(
            queries, query_labels, bank, bank_labels, KNN_KS, num_classes=classes),
    }
    if device.type == "cuda" and faiss_gpu_available():
        fns[f"search_faiss gpu k={k}"] = lambda: search_faiss(queries, bank, k, use_gpu=True)
    times = best_time(fns, device, args.repeats, args.warmup)
    return [{"stage": "knn", "model": name, "queries": n_query, "train": n_train, "dim": dim, "s_per_call": t}
            for name, t in times.items()]


# --- output --------------------------------------------------------------------------------------------------------


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_tables(rows: list[dict], device_name: str) -> None:
    """Markdown tables, one per stage, for bench/RESULTS.md; every row repeats the device it was measured on."""
    print(f"device: {device_name}")

    def dev(r: dict) -> str:
        return r.get("device", device_name)

    for r in rows:
        if r.get("kind") == "skipped" or str(r.get("status", "")).startswith("skipped") or r.get("status") == "error":
            print(f"\n**{r['stage']}: {r.get('model', '')} {r['status']}**")
    tests = [r for r in rows if r["stage"] == "tests" and r.get("kind") in ("summary", "test")]
    if tests:
        print("\n### tests (pytest -m gpu tests/test_gpu.py)\n")
        print(md_table(["test", "outcome", "s", "note", "device"],
                       [[r["model"], r["status"] if r["kind"] == "summary" else r["outcome"], fmt(r["seconds"], ".1f"),
                         (f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
                          if r["kind"] == "summary" else r["message"]), dev(r)] for r in tests]))
    steps = [r for r in rows if r["stage"] == "ssl-step" and r.get("kind") in ("step", "backend", "data-wait")]
    if steps:
        print("\n### ssl-step (one full DINOv2 step, random crops)\n")
        print(md_table(["model", "row", "compile", "mlstm", "batch", "s/step", "img/s", "peak GiB", "data wait",
                        "what", "device"],
                       [[r["model"], r["kind"], r["compile"], r["backend"], r["batch"], fmt(r["s_per_step"], ".4f"),
                         fmt(r["img_per_s"], ".1f"), fmt(r["peak_gib"], ".2f"),
                         fmt(r.get("data_wait_frac"), ".1%") if r["kind"] == "data-wait" else "", r["what"], dev(r)]
                        for r in steps]))
        for compiled in (False, True):
            by = {r["model"]: r for r in steps if r["kind"] == "step" and r["compile"] == compiled}
            if len(by) == 2:
                ratio = by["ViL-S/16"]["img_per_s"] / by["ViT-S/16"]["img_per_s"]
                print(f"\nViL / ViT img/s, compile={compiled}: {ratio:.2f}  (goal on a GPU with compile: >= 0.8)")
    kernels = [r for r in rows if r["stage"] == "mlstm"]
    if kernels:
        print(f"\n### mlstm kernels ({kernels[0]['tokens']} tokens, {kernels[0]['dtype']}, B=2, NH=4, DH=48)\n")
        print(md_table(["kernel", "mode", "ms", "vs chunkwise", "device"],
                       [[r["model"], r["mode"], fmt(r["s_per_call"] * 1e3, ".2f"),
                         fmt(r["s_per_call"] / next(c["s_per_call"] for c in kernels
                                                    if c["model"] == "chunkwise" and c["mode"] == r["mode"]), ".2f"),
                         dev(r)] for r in kernels]))
        for mode in ("fwd", "fwd+bwd"):
            by = {r["model"]: r["s_per_call"] for r in kernels if r["mode"] == mode}
            print(f"\n{mode}: parallel / chunkwise {by['parallel'] / by['chunkwise']:.2f}", end="")
            if "mlstm_kernels" in by:
                print(f", mlstm_kernels / chunkwise {by['mlstm_kernels'] / by['chunkwise']:.2f}", end="")
        print()
    res = [r for r in rows if r["stage"] == "resolution"]
    if res:
        print(f"\n### resolution (ViL-T/16 forward + backward, batch {res[0]['batch']}, {res[0]['precision']})\n")
        print(md_table(["mlstm", "px", "tokens", "ms", "peak GiB", "ms / 1k tokens", "device"],
                       [[r["backend"], r["px"], r["tokens"],
                         fmt(r["s_per_call"] and r["s_per_call"] * 1e3, ".2f") if r["status"] == "ok" else "OOM",
                         fmt(r["peak_gib"], ".2f"),
                         fmt(r["s_per_call"] and r["s_per_call"] * 1e6 / r["tokens"], ".3f"), dev(r)] for r in res]))
        for backend in dict.fromkeys(r["backend"] for r in res):
            ok = [r for r in res if r["backend"] == backend and r["status"] == "ok"]
            if len(ok) >= 2:
                first, last = ok[0], ok[-1]
                print(f"\n{backend}: {last['tokens'] / first['tokens']:.0f}x tokens -> "
                      f"{last['s_per_call'] / first['s_per_call']:.1f}x time", end="")
        print()
    knn = [r for r in rows if r["stage"] == "knn"]
    if knn:
        r0 = knn[0]
        print(f"\n### knn ({r0['queries']} queries x {r0['train']} train x dim {r0['dim']}, fp32)\n")
        print(md_table(["call", "s", "device"], [[r["model"], fmt(r["s_per_call"], ".4f"), dev(r)] for r in knn]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: check that every stage runs")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 64 on a GPU, 4 dry-run)")
    # 5 timed calls after 2 warm-ups on a GPU (steady state is reached by then) keep the run inside 8 minutes.
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default: 5 on a GPU, 2 dry-run)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 2, 1 dry-run)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget of the whole run, start-up included (default 450: inside 8 minutes)")
    p.add_argument("--tests-timeout-s", type=float, default=240.0, help="limit of the pytest subprocess")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here (after every stage)")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        p.error("no CUDA device; use --dry-run to check the script on CPU")
    args.batch = args.batch or (4 if args.dry_run else 64)
    args.repeats = args.repeats or (2 if args.dry_run else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    stage_fns = {"tests": stage_tests, "ssl-step": stage_ssl_step, "mlstm": stage_mlstm,
                 "resolution": stage_resolution, "knn": stage_knn}
    rows: list[dict] = []
    failed = False
    for stage in (s for s in RUN_ORDER if s in args.stages):
        log(f"stage {stage} ({seconds_left(args):.0f} s of the budget left)")
        try:
            # ssl-step bounds each of its row groups itself, to keep the groups it finished.
            with contextlib.nullcontext() if stage == "ssl-step" else time_limit(seconds_left(args)):
                new = stage_fns[stage](args, device)
        except BudgetExceeded:
            new = [{"stage": stage, "kind": "skipped", "model": "", "status": "skipped: time budget"}]
        except Exception:  # one broken stage must not cost the others their (GPU-time-limited) measurements
            failed = True
            log(f"stage {stage} failed:\n{traceback.format_exc()}")
            new = [{"stage": stage, "kind": "skipped", "model": "", "status": "error",
                    "message": traceback.format_exc(limit=3)[-1000:]}]
        release(device)
        rows += [{**r, "device": name} for r in new]
        failed |= any(r.get("kind") == "summary" and (r["failed"] or r["errors"]) for r in new)
        if args.json is not None:
            args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "dry_run": args.dry_run,
                                             "rows": rows}, indent=1))
    rows.sort(key=lambda r: STAGES.index(r["stage"]))  # stable: each stage's own row order is kept
    print_tables(rows, f"{name}, torch {torch.__version__}")
    log(f"done in {time.monotonic() - START:.0f} s")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
