"""Export a pretrained teacher backbone, and load any kind of backbone weights for evaluation.

``python -m ssl_vil.export RUN [--step N]`` writes ``RUN/export/teacher_backbone.safetensors`` and
``RUN/export/model.json`` (timm model name + constructor kwargs + the data normalisation used in pretraining).
After ``import ssl_vil`` the file loads with::

    timm.create_model(info["model"], pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="RUN/export/teacher_backbone.safetensors"), **info["kwargs"])
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_vil.config import RunConfig, load_config
from ssl_vil.infra.files import write_bytes_atomic, write_json_atomic

EXPORT_WEIGHTS = "teacher_backbone.safetensors"
EXPORT_INFO = "model.json"
TEACHER_PREFIX = "teacher.backbone."


def backbone_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """timm constructor overrides for the run's backbone (input size = the global crop size)."""
    m = cfg.model
    kw: dict[str, Any] = {"img_size": cfg.data.augment.global_size, "patch_size": m.patch_size,
                          "mlstm_backend": m.mlstm_backend}
    if m.dim is not None:
        kw["dim"] = m.dim
    if m.depth is not None:
        kw["depth"] = m.depth
    return kw


def model_info(cfg: RunConfig) -> dict[str, Any]:
    a = cfg.data.augment
    return {"model": cfg.model.name, "kwargs": backbone_kwargs(cfg), "img_size": a.global_size,
            "mean": list(a.mean), "std": list(a.std), "pooling": cfg.objective.pooling}


def teacher_backbone_state(objective_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher backbone's tensors out of an objective state dict (keys ``teacher.backbone.*``)."""
    sd = {k[len(TEACHER_PREFIX):]: v for k, v in objective_state.items() if k.startswith(TEACHER_PREFIX)}
    if not sd:
        raise KeyError(f"no '{TEACHER_PREFIX}*' tensors in the checkpoint's objective state")
    return sd


def _run_dir_of(checkpoint_dir: Path) -> Path:
    return checkpoint_dir.parent.parent  # RUN/checkpoints/step_XXXXXXXX


def _load_checkpoint_objective(step_dir: Path) -> dict[str, torch.Tensor]:
    from ssl_vil.checkpoint import CheckpointManager

    loaded = CheckpointManager.load_folder(step_dir)
    return loaded.payload["objective"]


def _find_step_dir(run_dir: Path, step: int | None) -> Path:
    from ssl_vil.checkpoint import latest_checkpoint

    if step is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"{run_dir}: no valid checkpoint under {run_dir / 'checkpoints'}")
        return found
    p = run_dir / "checkpoints" / f"step_{step:08d}"
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no checkpoint for step {step}")
    return p


def export_run(run_dir: str | Path, step: int | None = None) -> Path:
    """Write the teacher backbone of ``step`` (default: newest valid checkpoint) to ``RUN/export/``."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", world_size=1)
    step_dir = _find_step_dir(run_dir, step)
    sd = teacher_backbone_state(_load_checkpoint_objective(step_dir))
    out = run_dir / "export"
    data = save({k: v.contiguous() for k, v in sd.items()}, metadata={"source": str(step_dir.name)})
    write_bytes_atomic(out / EXPORT_WEIGHTS, data)
    info = model_info(cfg) | {"step": int(step_dir.name.split("_")[-1])}
    write_json_atomic(out / EXPORT_INFO, info)
    return out / EXPORT_WEIGHTS


def build_backbone(info: dict[str, Any]) -> nn.Module:
    import timm

    import ssl_vil  # noqa: F401  (registers the ViL models)

    return timm.create_model(info["model"], pretrained=False, num_classes=0, **info["kwargs"])


def load_pretrained_backbone(weights: str | Path, model: str | None = None, **kwargs: Any
                             ) -> tuple[nn.Module, dict[str, Any]]:
    """Teacher backbone (eval mode, no classifier) and its info, from any of:

    * a run dir (newest valid checkpoint's teacher; architecture from ``config.yaml``),
    * a checkpoint step folder ``RUN/checkpoints/step_XXXXXXXX``,
    * an exported ``.safetensors`` with ``model.json`` beside it,
    * any other weights file (official released ViL checkpoint, hub state dict, ...) with ``model`` naming the
      timm architecture and ``kwargs`` its overrides.
    """
    from ssl_vil.backbones import load_backbone_weights

    path = Path(weights)
    if path.is_dir() and (path / "config.yaml").exists():
        step_dir = _find_step_dir(path, None)
        cfg = load_config(path / "config.yaml", world_size=1)
        info, sd = model_info(cfg), teacher_backbone_state(_load_checkpoint_objective(step_dir))
        info["source"] = str(step_dir)
    elif path.is_dir() and (path / "manifest.json").exists():
        cfg = load_config(_run_dir_of(path) / "config.yaml", world_size=1)
        info, sd = model_info(cfg), teacher_backbone_state(_load_checkpoint_objective(path))
        info["source"] = str(path)
    elif path.is_file() and (path.parent / EXPORT_INFO).exists() and model is None:
        info = json.loads((path.parent / EXPORT_INFO).read_text())
        sd = None
        info["source"] = str(path)
    elif path.is_file():
        if model is None:
            raise ValueError(f"{path}: no model.json beside it; pass the timm model name (e.g. "
                             f"--model vil2_small_patch16_224) to load this weights file")
        info = {"model": model, "kwargs": dict(kwargs), "pooling": "bilateral_concat", "source": str(path)}
        sd = None
    else:
        raise FileNotFoundError(f"{path}: expected a run dir, a checkpoint folder or a weights file")
    net = build_backbone(info)
    load_backbone_weights(net, sd if sd is not None else path)
    cfg_data = getattr(net, "pretrained_cfg", {}) or {}
    info.setdefault("img_size", info["kwargs"].get("img_size", cfg_data.get("input_size", (3, 224, 224))[-1]))
    info.setdefault("mean", list(cfg_data.get("mean", (0.485, 0.456, 0.406))))
    info.setdefault("std", list(cfg_data.get("std", (0.229, 0.224, 0.225))))
    return net.eval(), info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export the teacher backbone of a pretraining run")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest valid)")
    args = ap.parse_args(argv)
    path = export_run(args.run_dir, args.step)
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
