"""The run directory: resolved config, environment record, and the resume-compatibility check.

Layout::

    RUN/config.yaml        resolved config (what eval and resume read)
    RUN/environment.json   git SHA, package versions, world size, host
    RUN/metrics.jsonl      one JSON object per logged step, plus events
    RUN/tb/                TensorBoard events
    RUN/checkpoints/       step folders + LATEST (see ssl_vil.checkpoint)
    RUN/export/            teacher_backbone.safetensors + model.json
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ssl_vil.config import ConfigError, RunConfig, diff_configs, load_config, to_yaml
from ssl_vil.infra.files import write_json_atomic, write_text_atomic

PACKAGES = ("torch", "torchvision", "timm", "lightly", "webdataset", "submitit", "numpy", "faiss-cpu", "faiss-gpu")


def git_sha() -> str | None:
    """The project's git commit, or None outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_record(world_size: int) -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"git_sha": git_sha(), "python": sys.version.split()[0], "packages": versions, "world_size": world_size,
            "host": platform.node(), "argv": sys.argv}


def check_resume_compatible(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to continue a run whose recorded config differs in keys that change what is computed."""
    recorded_path = run_dir / "config.yaml"
    if not recorded_path.exists():
        return
    recorded = load_config(recorded_path, world_size=cfg.derived.world_size)
    diffs = diff_configs(recorded, cfg)
    if diffs:
        lines = "\n".join(f"  {k}: run has {a!r}, now {b!r}" for k, a, b in diffs)
        raise ConfigError(f"{run_dir}: existing run has an incompatible config; differing keys:\n{lines}\n"
                          f"Use a new --output-dir, or revert these overrides to resume.")


def prepare_run_dir(run_dir: Path, cfg: RunConfig, *, is_main: bool) -> None:
    """Create the run dir and record config + environment (rank 0 only; others just check)."""
    check_resume_compatible(run_dir, cfg)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
        write_json_atomic(run_dir / "environment.json", environment_record(cfg.derived.world_size))
