"""Export a pretrained teacher backbone, and load any kind of backbone weights for evaluation.

``python -m ssl_vil.export RUN [--step N]`` writes ``RUN/export/teacher_backbone.safetensors`` and
``RUN/export/model.json``. The safetensors header describes the backbone (timm architecture, constructor kwargs,
input size, mean / std, crop_pct, interpolation; see :func:`ssl_vil.backbones.weights.export_metadata`) and
model.json repeats it, so after ``import ssl_vil`` the file alone gives the model and its data config::

    model = timm.create_model("vil2_small_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file="RUN/export/teacher_backbone.safetensors"))
    data_cfg = timm.data.resolve_model_data_config(model)  # the run's input size, mean, std

A timm ViT run (``model.name=vit_small_patch16_224``, ...) exports stock timm keys (the adapter's ``vit.`` prefix
removed, the iBOT mask token dropped), so stock timm loads it without this package; the architecture kwargs are
in model.json (``model_kwargs``: img_size, patch_size, embed_dim, depth, num_heads, dynamic_img_size)::

    model = timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file="RUN/export/teacher_backbone.safetensors"))
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors
from ssl_vil.infra.files import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:  # torch / timm load when weights are read or written, not for --help
    import torch
    from torch import nn

    from ssl_vil.checkpoint import LoadedCheckpoint
    from ssl_vil.config import RunConfig

EXPORT_WEIGHTS = "teacher_backbone.safetensors"
EXPORT_INFO = "model.json"
TEACHER_PREFIX = "teacher.backbone."


def backbone_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """timm constructor overrides for the run's backbone (input size = the global crop size)."""
    from ssl_vil.backbones.designs import DEFAULT_BLOCK_DESIGN

    m = cfg.model
    if is_vit_run(cfg):  # a timm VisionTransformer (ModelConfig.validate admits nothing else)
        return vit_backbone_kwargs(cfg)
    kw: dict[str, Any] = {"img_size": cfg.data.augment.global_size, "patch_size": m.patch_size,
                          "mlstm_backend": m.mlstm_backend}
    if m.dim is not None:
        kw["dim"] = m.dim
    if m.depth is not None:
        kw["depth"] = m.depth
    # Only a non-default design is stated, so the kwargs (and exports, model.json, golden files) of alternating
    # runs stay what they were; a reader that finds no block_design builds the default.
    if m.block_design != DEFAULT_BLOCK_DESIGN:
        kw["block_design"] = m.block_design
    if cfg.objective.pooling == "middle_cls":
        kw["cls_token"] = "middle"  # the learned middle token the pooling reads (absent otherwise: keys unchanged)
    return kw


def vit_backbone_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """timm constructor overrides of a ViT backbone: input size = the global crop size, ``dynamic_img_size``
    (position embedding interpolated for local crops), ``model.dim`` as ``embed_dim`` with the registered
    model's head width (``num_heads = dim // head width``), ``model.depth``."""
    from ssl_vil.backbones.vit_adapter import vit_facts

    m = cfg.model
    kw: dict[str, Any] = {"img_size": cfg.data.augment.global_size, "patch_size": m.patch_size,
                          "dynamic_img_size": True}
    if m.dim is not None:
        facts = vit_facts(m.name)
        assert facts is not None, m.name
        kw["embed_dim"] = m.dim
        kw["num_heads"] = max(1, m.dim // (facts["embed_dim"] // facts["num_heads"]))
    if m.depth is not None:
        kw["depth"] = m.depth
    return kw


def is_vit_run(cfg: RunConfig) -> bool:
    """Whether the run's backbone is a timm VisionTransformer (anything but this package's ViL models)."""
    from ssl_vil.backbones import MODEL_NAMES

    return cfg.model.name not in MODEL_NAMES


def architecture_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """:func:`backbone_kwargs` with ``dim`` and ``depth`` always stated (the registered model's when the
    config leaves them null), so the backbone can be rebuilt from them alone."""
    import timm

    import ssl_vil  # noqa: F401  (registers the ViL models)

    kw = backbone_kwargs(cfg)
    if is_vit_run(cfg):
        from ssl_vil.backbones.vit_adapter import vit_facts

        facts = vit_facts(cfg.model.name)
        assert facts is not None, cfg.model.name
        kw.setdefault("embed_dim", facts["embed_dim"])
        kw.setdefault("num_heads", facts["num_heads"])
        kw.setdefault("depth", facts["depth"])
        return kw
    if "dim" not in kw or "depth" not in kw:
        import torch

        with torch.device("meta"):
            net = timm.create_model(cfg.model.name, pretrained=False, num_classes=0, **kw)
        kw.setdefault("dim", int(net.dim))
        kw.setdefault("depth", int(net.depth))
    return kw


def model_info(cfg: RunConfig) -> dict[str, Any]:
    """model.json: the backbone's architecture and data config (``model`` / ``kwargs`` / ``img_size`` are the
    names earlier readers use for ``architecture`` / ``model_kwargs`` / ``input_size[-1]``)."""
    a = cfg.data.augment
    kwargs = architecture_kwargs(cfg)
    return {"architecture": cfg.model.name, "model_kwargs": kwargs, "input_size": [3, a.global_size, a.global_size],
            "mean": list(a.mean), "std": list(a.std), "crop_pct": cfg.knn_monitor.crop_pct,
            "interpolation": "bicubic", "pooling": cfg.objective.pooling,
            "model": cfg.model.name, "kwargs": kwargs, "img_size": a.global_size}


def teacher_backbone_state(objective_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher backbone's tensors out of an objective state dict (keys ``teacher.backbone.*``)."""
    sd = {k[len(TEACHER_PREFIX):]: v for k, v in objective_state.items() if k.startswith(TEACHER_PREFIX)}
    if not sd:
        raise KeyError(f"no '{TEACHER_PREFIX}*' tensors in the checkpoint's objective state")
    return sd


def _run_dir_of(checkpoint_dir: Path) -> Path:
    return checkpoint_dir.parent.parent  # RUN/checkpoints/step_XXXXXXXX


def _load_step(run_dir: Path, step: int | None) -> LoadedCheckpoint:
    """Checkpoint ``step`` of ``run_dir`` (default: the newest usable one), verified and loaded once."""
    from ssl_vil.checkpoint import load_latest_checkpoint

    if step is None:
        loaded = load_latest_checkpoint(run_dir)
        if loaded is None:
            raise FileNotFoundError(f"{run_dir}: no valid checkpoint under {run_dir / 'checkpoints'}")
        return loaded
    p = run_dir / "checkpoints" / f"step_{step:08d}"
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no checkpoint for step {step}")
    return _load_folder(p)


def _load_folder(step_dir: Path) -> LoadedCheckpoint:
    from ssl_vil.checkpoint import CheckpointManager

    return CheckpointManager.load_folder(step_dir)


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted: safetensors writes the metadata map in a per-process
    hash order, and one checkpoint must always export to the same bytes (resume tests compare them)."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to an 8-byte boundary
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def export_run(run_dir: str | Path, step: int | None = None) -> Path:
    """Write the teacher backbone of ``step`` (default: newest valid checkpoint) to ``RUN/export/``."""
    from safetensors.torch import save

    from ssl_vil.backbones.weights import export_metadata
    from ssl_vil.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", world_size=1)
    loaded = _load_step(run_dir, step)
    step_dir = loaded.path
    sd = teacher_backbone_state(loaded.payload["objective"])
    if is_vit_run(cfg):
        from ssl_vil.backbones.vit_adapter import timm_state_dict

        sd = timm_state_dict(sd)  # stock timm keys, mask token dropped: loads into timm without this package
    out = run_dir / "export"
    info = model_info(cfg) | {"step": int(step_dir.name.split("_")[-1])}
    metadata = export_metadata(info["architecture"], info["model_kwargs"], input_size=tuple(info["input_size"]),
                               mean=tuple(info["mean"]), std=tuple(info["std"]), crop_pct=info["crop_pct"],
                               interpolation=info["interpolation"], source=step_dir.name,
                               pooling=info["pooling"])
    data = canonical_safetensors(save({k: v.contiguous() for k, v in sd.items()}, metadata=metadata))
    write_bytes_atomic(out / EXPORT_WEIGHTS, data)
    write_json_atomic(out / EXPORT_INFO, info)
    return out / EXPORT_WEIGHTS


def _info_from_metadata(described: dict[str, Any]) -> dict[str, Any]:
    """model.json-style info from a self-describing file's header."""
    kwargs = dict(described["model_kwargs"])
    return {"architecture": described["architecture"], "model_kwargs": kwargs,
            "input_size": list(described["input_size"]), "mean": list(described["mean"]),
            "std": list(described["std"]), "crop_pct": described["crop_pct"],
            "interpolation": described["interpolation"], "pooling": described.get("pooling", "bilateral_concat"),
            "model": described["architecture"], "kwargs": kwargs, "img_size": int(described["input_size"][-1])}


def build_backbone(info: dict[str, Any]) -> nn.Module:
    import timm

    import ssl_vil  # noqa: F401  (registers the ViL models)

    return timm.create_model(info["model"], pretrained=False, num_classes=0, **info["kwargs"])


def _load_weights(net: nn.Module, source: Any) -> None:
    """Strict load of a ViL (any supported checkpoint format) or of a plain timm ViT (a run's adapter state or an
    export)."""
    from ssl_vil.backbones import load_backbone_weights
    from ssl_vil.backbones.vision_lstm import _VisionLSTMBase

    if isinstance(net, _VisionLSTMBase):
        load_backbone_weights(net, source)
    else:
        from ssl_vil.backbones.vit_adapter import load_vit_weights

        load_vit_weights(net, source)


def load_pretrained_backbone(weights: str | Path, model: str | None = None, **kwargs: Any
                             ) -> tuple[nn.Module, dict[str, Any]]:
    """Teacher backbone (eval mode, no classifier) and its info, from any of:

    * a run dir (newest valid checkpoint's teacher; architecture from ``config.yaml``),
    * a checkpoint step folder ``RUN/checkpoints/step_XXXXXXXX``,
    * an exported ``.safetensors`` (it describes itself; older exports need ``model.json`` beside them),
    * any other weights file (official released ViL checkpoint, hub state dict, ...) with ``model`` naming the
      timm architecture and ``kwargs`` its overrides.
    """
    from ssl_vil.backbones.weights import WeightLoadError, read_export_metadata
    from ssl_vil.config import load_config

    path = Path(weights)
    if path.is_dir() and (path / "config.yaml").exists():
        loaded = _load_step(path, None)
        cfg = load_config(path / "config.yaml", world_size=1)
        info, sd = model_info(cfg), teacher_backbone_state(loaded.payload["objective"])
        info["source"] = str(loaded.path)
    elif path.is_dir() and (path / "manifest.json").exists():
        cfg = load_config(_run_dir_of(path) / "config.yaml", world_size=1)
        info, sd = model_info(cfg), teacher_backbone_state(_load_folder(path).payload["objective"])
        info["source"] = str(path)
    elif path.is_file() and model is None and (described := read_export_metadata(path)) is not None:
        info = _info_from_metadata(described)
        sd = None
        info["source"] = str(path)
    elif path.is_file() and (path.parent / EXPORT_INFO).exists() and model is None:
        info = json.loads((path.parent / EXPORT_INFO).read_text())
        sd = None
        info["source"] = str(path)
    elif path.is_file():
        if model is None:
            raise WeightLoadError(f"{path}: no model.json beside it; pass the timm model name (e.g. "
                             f"--model vil2_small_patch16_224) to load this weights file")
        info = {"model": model, "kwargs": dict(kwargs), "pooling": "bilateral_concat", "source": str(path)}
        sd = None
    else:
        raise FileNotFoundError(f"{path}: expected a run dir, a checkpoint folder or a weights file")
    net = build_backbone(info)
    _load_weights(net, sd if sd is not None else path)
    cfg_data = getattr(net, "pretrained_cfg", {}) or {}
    info.setdefault("img_size", info["kwargs"].get("img_size", cfg_data.get("input_size", (3, 224, 224))[-1]))
    info.setdefault("mean", list(cfg_data.get("mean", (0.485, 0.456, 0.406))))
    info.setdefault("std", list(cfg_data.get("std", (0.229, 0.224, 0.225))))
    return net.eval(), info


PROG = "python -m ssl_vil.export"


@user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description="Export the teacher backbone of a pretraining run",
                                 formatter_class=HelpFormatter)
    add_version(ap)
    ap.add_argument("run_dir", type=Path, help="run directory written by python -m ssl_vil.train")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest valid)")
    args = ap.parse_args(argv)
    if not (args.run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{args.run_dir}: not a pretraining run directory (expected {args.run_dir}/config.yaml "
                                "written by python -m ssl_vil.train)")
    path = export_run(args.run_dir, args.step)
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
