"""Multi-crop augmentations driven by an explicit per-sample ``torch.Generator``."""

from ssl_vil.augment.digits import DigitsMultiCrop, DigitsMultiCropConfig, DigitsParams, DigitsViewParams
from ssl_vil.augment.multicrop import MultiCropConfig, MultiCropParams, MultiCropTransform, ViewParams
from ssl_vil.augment.presets import PRESETS, AugmentConfig, MultiCrop, build_multicrop, multicrop_from_config

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
