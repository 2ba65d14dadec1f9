"""timm registration of the ViL models (done on import of ``ssl_vil.backbones``).

Names: ``vil2_{tiny,small,base}_patch16_224`` (VisionLSTM2, 12 block pairs) and
``vil_{tiny,tinyplus,small,smallplus,base}_patch16_224`` (VisionLSTM v1). Every constructor keyword can be
overridden through ``timm.create_model(name, **kwargs)``, e.g. ``block_design="quad"`` for the v2 models (the
traversal design of each sub-block, see :mod:`ssl_vil.backbones.designs`; default "alternating", the official
model). Weights load through timm's machinery with
``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`` (``checkpoint_filter_fn`` converts official and
our own formats); pass ``num_classes`` in the overlay equal to the file's head size to keep its classifier
(timm drops the classifier when the model's and the cfg's class counts differ).

A ``.safetensors`` written by ``python -m ssl_vil.export`` describes itself: given as
``pretrained_cfg_overlay=dict(file=PATH)``, its architecture kwargs (dim, depth, patch size, input size, ...)
build the model and its data config (input size, mean, std, crop_pct, interpolation) becomes the model's
``pretrained_cfg``, so ``timm.data.resolve_model_data_config(model)`` gives the resolution and normalisation
the backbone was trained with, and the model has no classifier unless ``num_classes`` is passed. Explicit
kwargs that contradict the file (say ``dim``, or a ``block_design`` other than the file's; a v2 file that states
none holds the default "alternating") raise ``WeightLoadError`` naming them; ``img_size``,
``pooling`` and the mLSTM backend may differ (the position embedding is resized).

The official release URLs (ml.jku.at) are registered as pretrained tags; they use the training-code key
format, which ``checkpoint_filter_fn`` renames. The stride-8 long-sequence files are not tagged: load them
with ``stride=8`` and ``pretrained_cfg_overlay=dict(file=...)``.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ssl_vil.backbones.designs import DEFAULT_BLOCK_DESIGN
from ssl_vil.backbones.embed import to_2tuple
from ssl_vil.backbones.vision_lstm import VisionLSTM, VisionLSTM2
from ssl_vil.backbones.weights import WeightLoadError, checkpoint_filter_fn, read_export_metadata

_RELEASE_URL = "https://ml.jku.at/research/vision_lstm/download/"


def _cfg(file_name: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": _RELEASE_URL + file_name if file_name else "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        # Official eval: resize the short side to 224 then center-crop 224.
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2406.04303",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vil2_tiny_patch16_224.in1k_e800": _cfg("vil2_tiny16_e800_in1k.th"),
    "vil2_tiny_patch16_224.in1k_e400": _cfg("vil2_tiny16_e400_in1k.th"),
    "vil2_small_patch16_224.in1k_e400": _cfg("vil2_small16_e400_in1k.th"),
    "vil2_base_patch16_224.in1k_e400": _cfg("vil2_base16_e400_in1k.th"),
    "vil_tiny_patch16_224.in1k_e800": _cfg("vil_tiny16_e800_in1k.th"),
    "vil_tiny_patch16_224.in1k_e400": _cfg("vil_tiny16_e400_in1k.th"),
    "vil_tinyplus_patch16_224.in1k_e800": _cfg("vil_tinyplus16_e800_in1k.th"),
    "vil_tinyplus_patch16_224.in1k_e400": _cfg("vil_tinyplus16_e400_in1k.th"),
    "vil_small_patch16_224.in1k_e400": _cfg("vil_small16_e400_in1k.th"),
    "vil_smallplus_patch16_224.in1k_e400": _cfg("vil_smallplus16_e400_in1k.th"),
    "vil_base_patch16_224.in1k_e400": _cfg("vil_base16_e400_in1k.th"),
})


# Constructor kwargs that change no tensor shape of the backbone: a self-describing file's value is a default.
RUNTIME_KWARGS = ("img_size", "pooling", "mlstm_backend", "mlstm_chunk_size")


def _family(name: str) -> type | None:
    return VisionLSTM2 if name.startswith("vil2_") else VisionLSTM if name.startswith("vil_") else None


def _normalised(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def apply_file_description(model_cls: type, variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` of a ``create_model`` call completed from the self-describing file in
    ``pretrained_cfg_overlay["file"]`` (unchanged for any other file): the file's architecture kwargs under the
    caller's, and its data config under the caller's overlay. Raises ``WeightLoadError`` when the file holds
    another model family or the caller's kwargs contradict its shapes."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    path = overlay.get("file")
    described = read_export_metadata(path) if path else None
    if described is None:
        return kwargs
    arch = described["architecture"]
    if _family(arch) is not model_cls:
        raise WeightLoadError(f"{path}: holds a {arch} backbone; load it with timm.create_model({arch!r}, "
                              f"pretrained=True, pretrained_cfg_overlay=dict(file=...)), not {variant!r}")
    file_kwargs = dict(described["model_kwargs"])
    # Exports state block_design only when it is not the default, so a v2 file without it holds that default.
    implied = {"block_design": DEFAULT_BLOCK_DESIGN} if model_cls is VisionLSTM2 else {}
    conflicts = [f"{k}={kwargs[k]!r} (the file was trained with {k}={v!r})"
                 for k, v in {**implied, **file_kwargs}.items()
                 if k in kwargs and k not in RUNTIME_KWARGS and _normalised(kwargs[k]) != _normalised(v)]
    if conflicts:
        raise WeightLoadError(f"{path}: the arguments {', '.join(conflicts)} contradict the exported {arch}; "
                              "leave them out: the file supplies them")
    merged = {**file_kwargs, **{k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}}
    height, width = to_2tuple(merged.get("img_size", described["input_size"][-2:]))
    data_cfg = {"input_size": (int(described["input_size"][0]), int(height), int(width)),
                "mean": tuple(described["mean"]), "std": tuple(described["std"]),
                "crop_pct": float(described["crop_pct"]), "interpolation": described["interpolation"],
                # An export is a backbone: no classifier unless the caller asks for num_classes.
                "num_classes": 0}
    merged["pretrained_cfg_overlay"] = {**data_cfg, **overlay}
    return merged


def _create(model_cls: type, variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any):
    if pretrained:
        kwargs = apply_file_description(model_cls, variant, kwargs)
    args = {**model_args, **kwargs}
    model = build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter"),
        **args,
    )
    return model


_V2_DEFAULTS = dict(patch_size=16, depth=12, pooling="bilateral_concat", legacy_norm=True)
_V1_DEFAULTS = dict(patch_size=16, pooling="bilateral_avg", legacy_norm=True)


@register_model
def vil2_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionLSTM2:
    """ViL-T (v2): dim 192, 12 block pairs, 6.39M params."""
    return _create(VisionLSTM2, "vil2_tiny_patch16_224", pretrained, dict(_V2_DEFAULTS, dim=192), **kwargs)


@register_model
def vil2_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionLSTM2:
    """ViL-S (v2): dim 384, 12 block pairs, 23.4M params."""
    return _create(VisionLSTM2, "vil2_small_patch16_224", pretrained, dict(_V2_DEFAULTS, dim=384), **kwargs)


@register_model
def vil2_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionLSTM2:
    """ViL-B (v2): dim 768, 12 block pairs, 89.3M params."""
    return _create(VisionLSTM2, "vil2_base_patch16_224", pretrained, dict(_V2_DEFAULTS, dim=768), **kwargs)


@register_model
def vil_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-T (v1): dim 192, 24 blocks."""
    return _create(VisionLSTM, "vil_tiny_patch16_224", pretrained, dict(_V1_DEFAULTS, dim=192, depth=24), **kwargs)


@register_model
def vil_tinyplus_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-T+ (v1): dim 192, 29 blocks."""
    return _create(VisionLSTM, "vil_tinyplus_patch16_224", pretrained, dict(_V1_DEFAULTS, dim=192, depth=29),
                   **kwargs)


@register_model
def vil_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-S (v1): dim 384, 24 blocks."""
    return _create(VisionLSTM, "vil_small_patch16_224", pretrained, dict(_V1_DEFAULTS, dim=384, depth=24), **kwargs)


@register_model
def vil_smallplus_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-S+ (v1): dim 384, 26 blocks."""
    return _create(VisionLSTM, "vil_smallplus_patch16_224", pretrained, dict(_V1_DEFAULTS, dim=384, depth=26),
                   **kwargs)


@register_model
def vil_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionLSTM:
    """ViL-B (v1): dim 768, 24 blocks."""
    return _create(VisionLSTM, "vil_base_patch16_224", pretrained, dict(_V1_DEFAULTS, dim=768, depth=24), **kwargs)
