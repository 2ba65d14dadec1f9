"""Multi-crop augmentations driven by an explicit per-sample ``torch.Generator``."""

from typing import TYPE_CHECKING

from ssl_vil.infra.lazy_exports import lazy_getattr

if TYPE_CHECKING:
    from ssl_vil.augment.digits import DigitsMultiCrop, DigitsMultiCropConfig, DigitsParams, DigitsViewParams
    from ssl_vil.augment.multicrop import MultiCropConfig, MultiCropParams, MultiCropTransform, ViewParams
    from ssl_vil.augment.presets import PRESETS, AugmentConfig, MultiCrop, build_multicrop, multicrop_from_config

# Loaded on first use: a config check (``ssl_vil.augment.presets``) does not pay for torchvision.
_LAZY = {
    "AugmentConfig": "ssl_vil.augment.presets",
    "DigitsMultiCrop": "ssl_vil.augment.digits",
    "DigitsMultiCropConfig": "ssl_vil.augment.digits",
    "DigitsParams": "ssl_vil.augment.digits",
    "DigitsViewParams": "ssl_vil.augment.digits",
    "MultiCrop": "ssl_vil.augment.presets",
    "MultiCropConfig": "ssl_vil.augment.multicrop",
    "MultiCropParams": "ssl_vil.augment.multicrop",
    "MultiCropTransform": "ssl_vil.augment.multicrop",
    "PRESETS": "ssl_vil.augment.presets",
    "ViewParams": "ssl_vil.augment.multicrop",
    "build_multicrop": "ssl_vil.augment.presets",
    "multicrop_from_config": "ssl_vil.augment.presets",
}

__all__ = [
    "PRESETS",
    "AugmentConfig",
    "DigitsMultiCrop",
    "DigitsMultiCropConfig",
    "DigitsParams",
    "DigitsViewParams",
    "MultiCrop",
    "MultiCropConfig",
    "MultiCropParams",
    "MultiCropTransform",
    "ViewParams",
    "build_multicrop",
    "multicrop_from_config",
]


__getattr__ = lazy_getattr(__name__, _LAZY)
