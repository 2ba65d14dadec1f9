"""Shared helpers for trainer tests: synthetic shards with visible identity, real multi-process launches."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

import faultinject

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo_digits.yaml"


def write_shards(out: Path, n_shards: int = 6, per_shard: int = 24, size: int = 32) -> list[str]:
    """Shards whose keys encode shard and index (``s03_i0017``) and whose images are all distinct."""
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"synth-{s:06d}.tar")) as w:
            for i in range(per_shard):
                key = f"s{s:02d}_i{i:04d}"
                rng = np.random.default_rng(s * 1000 + i)
                img = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).resize((size, size), Image.NEAREST).save(buf, format="PNG")
                w.write({"__key__": key, "png": buf.getvalue(), "cls": str((s + i) % 10)})
                keys.append(key)
    return keys


# Loss weights (dino, ibot, koleo) of the three methods, as the recipes state them.
OBJECTIVE_WEIGHTS = {"dino": (1.0, 0.0, 0.0), "ibot": (1.0, 1.0, 0.0), "dinov2": (1.0, 1.0, 0.1)}


def objective_overrides(objective: str) -> list[str]:
    """``objective.*_weight`` overrides that make a run DINO, iBOT or DINOv2."""
    dino, ibot, koleo = OBJECTIVE_WEIGHTS[objective]
    return [f"objective.dino_weight={dino}", f"objective.ibot_weight={ibot}", f"objective.koleo_weight={koleo}"]


def tiny_overrides(shards: Path, *, total_steps: int = 40, batch: int = 8, objective: str = "dinov2",
                   workers: int = 2) -> list[str]:
    """The reliability-test setup: tiny ViL2 (dim 64, depth 2, patch 4, 32 px), 2 global + 2 local crops, K = 256."""
    return [
        f"data.train={shards}", *objective_overrides(objective), "objective.dino_head.out_dim=256",
        "objective.dino_head.hidden_dim=128", "objective.dino_head.bottleneck_dim=32",
        "objective.ibot_head.out_dim=256", "objective.ibot_head.hidden_dim=128", "objective.ibot_head.bottleneck_dim=32",
        "data.augment.n_local=2", f"data.num_workers={workers}", "data.shuffle_window_samples=16",
        f"optim.global_batch_size={batch}", f"schedule.total_steps={total_steps}", "schedule.warmup_steps=4",
        "schedule.freeze_last_layer_steps=2", "checkpoint.every_steps=5", "checkpoint.keep_last=3",
        "logging.log_every_steps=10", "logging.tensorboard=false",
        "guards.spike_detection=false", "objective.pooling=auto",  # ViL's default [CLS]: bilateral concat
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, overrides: list[str], *, world_size: int = 1, fault: str | None = None,
           extra_env: dict[str, str] | None = None, keys_log: bool = True) -> list[subprocess.Popen]:
    """Start ``world_size`` real trainer processes (gloo on CPU) for ``run_dir``, with the test fault hooks
    (tests/faultinject): ``fault`` is the ``SSL_VIL_FAULT`` spec; ``keys_log`` writes ``RUN/keys/rank{r}.jsonl``."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
        env.pop(faultinject.ENV_VAR, None)
        env.pop(faultinject.KEYLOG_VAR, None)
        env = faultinject.child_env(env, fault=fault or None, keys_dir=run_dir / "keys" if keys_log else None)
        env.update(extra_env or {})
        log = open(run_dir.parent / f"{run_dir.name}.rank{rank}.log", "ab")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ssl_vil.train", "--config", str(RECIPE), "--output-dir", str(run_dir), *overrides],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 240.0) -> list[int]:
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


def run_training(run_dir: Path, overrides: list[str], *, world_size: int = 1, fault: str | None = None,
                 timeout: float = 240.0) -> list[int]:
    return wait_all(launch(run_dir, overrides, world_size=world_size, fault=fault), timeout)


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.parent.glob(f"{run_dir.name}.rank*.log")))


def losses(run_dir: Path) -> dict[int, float]:
    """{step: total loss} from metrics.jsonl (the last record of a step wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "step" in rec and "losses" in rec:
            out[rec["step"]] = rec["losses"]["loss"]
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_payload(run_dir: Path) -> dict:
    from ssl_vil.checkpoint import CheckpointManager, latest_checkpoint

    return CheckpointManager.load_folder(latest_checkpoint(run_dir)).payload


def assert_tree_equal(a, b, path: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and python values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), f"tensors differ at {path}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"keys differ at {path}: {list(a)} vs {list(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"values differ at {path}: {a!r} vs {b!r}"
