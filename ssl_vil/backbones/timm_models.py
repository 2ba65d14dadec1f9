"""timm registration of the ViL models (done on import of ``ssl_vil.backbones``).

Names: ``vil2_{tiny,small,base}_patch16_224`` (VisionLSTM2, 12 block pairs) and
``vil_{tiny,tinyplus,small,smallplus,base}_patch16_224`` (VisionLSTM v1). Every constructor keyword can be
overridden through ``timm.create_model(name, **kwargs)``. Weights load through timm's machinery with
``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`` (``checkpoint_filter_fn`` converts official and
our own formats); pass ``num_classes`` in the overlay equal to the file's head size to keep its classifier
(timm drops the classifier when the model's and the cfg's class counts differ).

The official release URLs (ml.jku.at) are registered as pretrained tags; they use the training-code key
format, which ``checkpoint_filter_fn`` renames. The stride-8 long-sequence files are not tagged: load them
with ``stride=8`` and ``pretrained_cfg_overlay=dict(file=...)``.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ssl_vil.backbones.vision_lstm import VisionLSTM, VisionLSTM2
from ssl_vil.backbones.weights import checkpoint_filter_fn

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


def _create(model_cls: type, variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any):
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
