"""Loading ViL weights from any of the formats we meet into a ``VisionLSTM2`` / ``VisionLSTM``.

Accepted inputs (file: ``.pth``/``.pt``/``.th`` via ``torch.load(weights_only=True)``, or ``.safetensors``; or an
in-memory dict):
  * official released files: ``{"state_dict": {training-code keys}}`` (``xlstm.blocks.{i}.xlstm...``), renamed
    with the official hub rules (spec section 1.1);
  * official hub-key state_dicts;
  * our SSL checkpoints / exports: nested under ``teacher`` (preferred), ``student``, ``model`` or
    ``state_dict`` (as dicts, or as flat ``teacher.*`` / ``student.*`` key prefixes); ``module.`` /
    ``_orig_mod.`` wrapper prefixes are stripped; if keys carry a ``backbone.`` prefix only those are kept
    (SSL heads, centers and the like live outside it); ``dino_head.*`` / ``ibot_head.*`` and non-classifier
    ``head.*`` keys are dropped.
Then: the position embedding is resized (bicubic) to the model's grid; a ``mask_token`` the model lacks is
dropped; classifier-side tensors (``head.*`` and the pre-head norm, which the training code stored as
``head.0``) that are absent or do not fit the model keep the model's own initialisation. Anything else
that is missing, unexpected or of the wrong shape raises ``WeightLoadError`` listing every offending key.

A ``.safetensors`` written by ``python -m ssl_vil.export`` describes itself in its header metadata
(:func:`export_metadata`, read back by :func:`read_export_metadata`): the timm architecture, its constructor
kwargs and the data config (input size, mean, std, crop_pct, interpolation) the backbone was trained for.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_vil.backbones.embed import resize_pos_embed
from ssl_vil.backbones.vision_lstm import VisionLSTM, VisionLSTM2, _VisionLSTMBase

_logger = logging.getLogger(__name__)

NESTED_STATE_KEYS = ("teacher", "student", "model", "state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SSL_HEAD_PREFIXES = ("dino_head.", "ibot_head.")
POS_EMBED_KEY = "pos_embed.embed"
MASK_TOKEN_KEY = "mask_token"


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model; the message lists the offending keys and shapes."""


# ----------------------------------------------------------------------------------- self-describing exports
EXPORT_FORMAT = "ssl_vil.backbone"
# safetensors metadata is str -> str: these entries hold JSON, the others plain strings.
_JSON_FIELDS = ("model_kwargs", "input_size", "mean", "std", "crop_pct")
_TEXT_FIELDS = ("architecture", "interpolation")


def export_metadata(architecture: str, model_kwargs: Mapping[str, Any], *, input_size: tuple[int, int, int],
                    mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float,
                    interpolation: str = "bicubic", **extra: str) -> dict[str, str]:
    """The safetensors header metadata of an exported backbone (``extra``: further plain-text entries)."""
    described = {"model_kwargs": dict(model_kwargs), "input_size": list(input_size), "mean": list(mean),
                 "std": list(std), "crop_pct": float(crop_pct)}
    meta = {"format": EXPORT_FORMAT, "architecture": architecture, "interpolation": interpolation}
    meta.update({k: json.dumps(v) for k, v in described.items()})
    meta.update(extra)
    return meta


def read_export_metadata(path: str | Path) -> dict[str, Any] | None:
    """The self-description of an ``ssl_vil.export`` file (header only, no tensors read), or None for any
    other file: ``{"architecture", "model_kwargs", "input_size", "mean", "std", "crop_pct", "interpolation"}``
    plus the extra plain-text entries (``source``, ``pooling``)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise WeightLoadError(f"{path}: not a readable safetensors file ({_first_line(error)})") from error
    if meta.get("format") != EXPORT_FORMAT:
        return None
    missing = [k for k in (*_JSON_FIELDS, *_TEXT_FIELDS) if k not in meta]
    if missing:
        raise WeightLoadError(f"{path}: ssl_vil export metadata lacks {missing}; re-export it with "
                              "python -m ssl_vil.export RUN")
    out: dict[str, Any] = {k: meta[k] for k in _TEXT_FIELDS}
    for key in _JSON_FIELDS:
        try:
            out[key] = json.loads(meta[key])
        except json.JSONDecodeError:
            raise WeightLoadError(f"{path}: metadata entry {key!r} is not JSON: {meta[key]!r}") from None
    out["input_size"] = tuple(out["input_size"])
    out["mean"], out["std"] = tuple(out["mean"]), tuple(out["std"])
    out.update({k: v for k, v in meta.items() if k not in out and k != "format"})  # e.g. source, pooling
    return out


@dataclass
class LoadReport:
    """What ``convert_state_dict`` changed: keys kept from the model's init, dropped, or resized."""

    reinitialized: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ unwrapping
def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Descend into ``teacher``/``student``/``model``/``state_dict`` until a flat name -> tensor dict remains."""
    obj: Any = checkpoint
    path: list[str] = []
    while isinstance(obj, Mapping) and any(isinstance(v, Mapping) for v in obj.values()):
        key = next((k for k in NESTED_STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            nested = sorted(k for k, v in obj.items() if isinstance(v, Mapping))
            raise WeightLoadError(
                f"checkpoint{''.join(f'[{p!r}]' for p in path)} holds nested dicts {nested} but none of "
                f"{NESTED_STATE_KEYS}; cannot find the model weights"
            )
        obj = obj[key]
        path.append(key)
    if not isinstance(obj, Mapping):
        raise WeightLoadError(f"checkpoint is a {type(obj).__name__}, expected a dict of tensors")
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise WeightLoadError(f"checkpoint entries that are not tensors: {bad[:20]}")
    return dict(obj)


def _strip_wrappers(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
    return key


def _select_prefix(
    state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...], report: LoadReport
) -> dict[str, torch.Tensor]:
    """Keep only the keys under the first of ``prefixes`` that any key carries (prefix removed)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state_dict):
            report.dropped += [k for k in state_dict if not k.startswith(prefix)]
            return {_strip_wrappers(k[len(prefix):]): v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Remove DDP/compile wrapper prefixes; of flat ``teacher.*`` / ``student.*`` keys keep the teacher's; then
    keep only ``backbone.*`` (prefix removed) if present."""
    cleaned = {_strip_wrappers(k): v for k, v in state_dict.items()}
    cleaned = _select_prefix(cleaned, ("teacher.", "student."), report)
    return _select_prefix(cleaned, ("backbone.",), report)


def drop_ssl_heads(state_dict: Mapping[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Drop ``dino_head.*`` / ``ibot_head.*`` and any ``head.<module>.<param>`` (the classifier is ``head.weight``
    / ``head.bias``; deeper names belong to projection heads)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(SSL_HEAD_PREFIXES) or (key.startswith("head.") and key.count(".") > 1):
            report.dropped.append(key)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------ training-code key renaming
_RAW_BLOCK = re.compile(r"^xlstm\.blocks\.(\d+)\.(xlstm_norm|xlstm)\.(.+)$")


def is_training_code_format(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("xlstm.") for k in state_dict)


def rename_training_code_keys(state_dict: Mapping[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """Rename released-checkpoint (training-code) keys to hub keys for ViL ``version`` 1 or 2 (spec 1.1)."""
    out = {}
    for key, value in state_dict.items():
        new = key
        match = _RAW_BLOCK.match(key)
        if match:
            index, part, rest = int(match.group(1)), match.group(2), match.group(3)
            if version == 2:
                direction = "rowwise_from_top_left" if index % 2 == 0 else "rowwise_from_bot_right"
                prefix = f"blocks.{index // 2}.{direction}"
                rest = re.sub(r"^conv1d\.(weight|bias)$", r"conv.\1", rest)  # v2 conv is a plain Conv2d
            else:
                prefix = f"blocks.{index}"
            new = f"{prefix}.norm.{rest}" if part == "xlstm_norm" else f"{prefix}.layer.{rest}"
        elif key.startswith("xlstm.post_blocks_norm."):
            new = ("norm." if version == 2 else "legacy_norm.") + key[len("xlstm.post_blocks_norm."):]
        elif key.startswith("head.0."):
            new = ("legacy_norm." if version == 2 else "norm.") + key[len("head.0."):]
        elif key.startswith("head.1."):
            new = "head." + key[len("head.1."):]
        out[new] = value
    return out


# ----------------------------------------------------------------------------------------------- conversion
def classifier_prefixes(model: _VisionLSTMBase) -> tuple[str, ...]:
    """Key prefixes of the classifier side of ``model``: the head and the pre-head norm."""
    if isinstance(model, VisionLSTM2):
        return ("head.", "legacy_norm.")
    if isinstance(model, VisionLSTM) and model.use_legacy_norm:
        return ("head.", "norm.")
    return ("head.",)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def convert_state_dict(
    checkpoint: Mapping[str, Any], model: nn.Module, report: LoadReport | None = None
) -> dict[str, torch.Tensor]:
    """Turn any supported checkpoint into a state_dict that ``model.load_state_dict(strict=True)`` accepts.

    Raises ``WeightLoadError`` naming every missing / unexpected / mis-shaped non-classifier key.
    """
    if not isinstance(model, _VisionLSTMBase):
        raise TypeError(f"expected a VisionLSTM2 / VisionLSTM model, got {type(model).__name__}")
    report = report if report is not None else LoadReport()
    state_dict = strip_prefixes(unwrap_state_dict(checkpoint), report)
    if is_training_code_format(state_dict):
        state_dict = rename_training_code_keys(state_dict, version=2 if isinstance(model, VisionLSTM2) else 1)
    state_dict = drop_ssl_heads(state_dict, report)

    target = model.state_dict()
    classifier = classifier_prefixes(model)
    if POS_EMBED_KEY in state_dict and POS_EMBED_KEY in target:
        source, wanted = state_dict[POS_EMBED_KEY], target[POS_EMBED_KEY]
        if source.ndim == 4 and source.shape[-1] == wanted.shape[-1] and source.shape != wanted.shape:
            compute_dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
            resized = resize_pos_embed(source.to(compute_dtype), (wanted.shape[1], wanted.shape[2]))
            state_dict[POS_EMBED_KEY] = resized.to(source.dtype)
            report.resized.append(f"{POS_EMBED_KEY} {_shape(source)} -> {_shape(wanted)}")
    if MASK_TOKEN_KEY in state_dict and MASK_TOKEN_KEY not in target:
        del state_dict[MASK_TOKEN_KEY]
        report.dropped.append(MASK_TOKEN_KEY)

    unexpected, mismatched = [], []
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        is_classifier = key.startswith(classifier)
        if key not in target:
            if is_classifier:
                report.dropped.append(key)
            else:
                unexpected.append(f"{key} {_shape(value)}")
        elif value.shape != target[key].shape:
            if is_classifier:
                report.dropped.append(key)
            else:
                mismatched.append(f"{key}: checkpoint {_shape(value)} vs model {_shape(target[key])}")
        else:
            out[key] = value
    missing = []
    for key, value in target.items():
        if key in out:
            continue
        if key.startswith(classifier) or key == MASK_TOKEN_KEY:
            out[key] = value  # keep the model's own initialisation
            report.reinitialized.append(key)
        elif key not in state_dict:  # present but mis-shaped keys are listed as mismatches
            missing.append(f"{key} {_shape(value)}")
    if unexpected or mismatched or missing:
        lines = [f"checkpoint does not fit {type(model).__name__} (dim={model.dim}, depth={model.depth})"
                 + _describe_source(state_dict) + ":"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                more = " ..." if len(items) > 30 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:30]) + more)
        raise WeightLoadError("\n".join(lines))
    if report.reinitialized:
        _logger.info("kept the model's initialisation for %s", ", ".join(report.reinitialized))
    if report.dropped:
        _logger.info("dropped checkpoint keys: %s", ", ".join(report.dropped[:50]))
    # Same key order as the model's state_dict.
    return {key: out[key] for key in target}


def _describe_source(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"; the checkpoint is dim=64, depth=2, patch_size=4"`` read off its tensor shapes ("" if unknown)."""
    parts = []
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        parts += [f"dim={proj.shape[0]}", f"patch_size={proj.shape[-1]}"]
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if blocks:
        parts.insert(1, f"depth={max(blocks) + 1}")
    return f"; the checkpoint is {', '.join(parts)}" if parts else ""


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: ``convert_state_dict`` for ``build_model_with_cfg``."""
    return convert_state_dict(state_dict, model)


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """Read a checkpoint file on CPU: ``.safetensors`` or a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types for a damaged or foreign file
            raise WeightLoadError(
                f"{path}: not a readable safetensors file ({_first_line(error)}); expected a file written by "
                "safetensors (e.g. python -m ssl_vil.export RUN)"
            ) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled non-tensor objects are refused by weights_only
        raise WeightLoadError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({_first_line(error)}); expected a plain "
            "tensor dict (torch.save(model.state_dict(), ...)) or a .safetensors file"
        ) from error


def _first_line(error: BaseException) -> str:
    """The gist of a library error whose message runs over many lines: torch.load's weights_only refusal gives
    its reason (e.g. ``Unsupported global: GLOBAL argparse.Namespace``) after paragraphs of advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip()
        reason = reason.split("\n\n")[0].split(". ")[0].strip()
        if reason:
            return reason
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__


def load_backbone_weights(model: nn.Module, path_or_state_dict: str | Path | Mapping[str, Any]) -> LoadReport:
    """Load weights from a file or a (possibly nested) dict into ``model`` strictly (see the module doc).

    Returns a ``LoadReport``; raises ``WeightLoadError`` if the checkpoint does not fit.
    """
    checkpoint = (
        path_or_state_dict if isinstance(path_or_state_dict, Mapping) else read_checkpoint(path_or_state_dict)
    )
    report = LoadReport()
    state_dict = convert_state_dict(checkpoint, model, report)
    model.load_state_dict(state_dict, strict=True)
    return report
