"""Named multi-crop presets (DINO, iBOT, DINOv2 crop counts and scales; a digits preset for the demo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from PIL import Image
from torch import Tensor

from ssl_vil.augment.digits import DigitsMultiCrop, DigitsMultiCropConfig
from ssl_vil.augment.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REFERENCE_SIZE,
    MultiCropConfig,
    MultiCropTransform,
)
from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid

Preset = Literal["dino", "ibot", "dinov2", "digits"]


class MultiCrop(Protocol):
    """Augmentation contract of the data stream: all randomness comes from ``generator``."""

    def __call__(self, image: Image.Image, generator: torch.Generator) -> list[Tensor]: ...

    def sample_params(self, generator: torch.Generator, image_size: tuple[int, int]) -> Any: ...

    def apply(self, image: Image.Image, params: Any) -> list[Tensor]: ...


# Reference-resolution (224 px) settings of the papers; local crops are 96 px there.
PRESETS: dict[str, dict[str, Any]] = {
    "dino": {"n_global": 2, "n_local": 8, "global_scale": (0.4, 1.0), "local_scale": (0.05, 0.4)},
    "ibot": {"n_global": 2, "n_local": 10, "global_scale": (0.25, 1.0), "local_scale": (0.05, 0.25)},
    "dinov2": {"n_global": 2, "n_local": 8, "global_scale": (0.32, 1.0), "local_scale": (0.05, 0.32)},
    "digits": {},
}
_REFERENCE_LOCAL_SIZE = 96
assert set(PRESETS) == set(get_args(Preset))


@dataclass(kw_only=True, slots=True)
class AugmentConfig(Config):
    """The multi-crop views of pretraining; the run config's ``data.augment:`` section.

    ``preset`` picks the transform family (DINO-style colour augmentations, or "digits" for the demo); every other
    field is stated, not taken from the preset. Sizes are in pixels of the network input. ``blur``: "dino"
    applies blur with p = 1.0 / 0.1 / 0.5 (first global / other globals / locals); "dinov2" reproduces its
    released 0.0 / 0.9 / 0.5 (ignored by "digits").
    """

    preset: Preset = "dinov2"
    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    blur: Literal["dino", "dinov2"] = "dino"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def validate(self) -> None:
        for name in ("global_size", "n_global"):
            if getattr(self, name) <= 0:
                raise invalid(name, getattr(self, name), "a positive integer")
        if self.n_local < 0:
            raise invalid("n_local", self.n_local, "a non-negative integer")
        if self.n_local > 0 and self.local_size <= 0:
            raise invalid("local_size", self.local_size, "a positive integer")
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise invalid(name, [low, high], "[min, max] with 0 < min <= max <= 1")
        if any(s <= 0 for s in self.std):
            raise invalid("std", list(self.std), "positive values")


def multicrop_from_config(cfg: AugmentConfig) -> MultiCropTransform | DigitsMultiCrop:
    """The multi-crop transform ``cfg`` describes."""
    extra: dict[str, Any] = {} if cfg.preset == "digits" else {"dinov2_blur_bug": cfg.blur == "dinov2"}
    return build_multicrop(cfg.preset, global_size=cfg.global_size, local_size=cfg.local_size,
                           n_global=cfg.n_global, n_local=cfg.n_local, global_scale=cfg.global_scale,
                           local_scale=cfg.local_scale, mean=cfg.mean, std=cfg.std, **extra)


def build_multicrop(
    preset: str,
    *,
    global_size: int | None = None,
    local_size: int | None = None,
    n_global: int | None = None,
    n_local: int | None = None,
    global_scale: tuple[float, float] | None = None,
    local_scale: tuple[float, float] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **overrides: Any,
) -> MultiCropTransform | DigitsMultiCrop:
    """Build a multi-crop transform ``(PIL image, torch.Generator) -> [global_1, global_2, local_1, ...]``.

    Arguments left as None take the preset's value. Without ``local_size``, local crops keep the papers'
    96/224 size ratio (rounded), or half the global size for "digits". Further keyword arguments are fields
    of :class:`MultiCropConfig` (or :class:`DigitsMultiCropConfig` for "digits"), e.g. ``blur_probs``,
    ``dinov2_blur_bug``, ``jitter_strength``, ``solarize_prob``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown multi-crop preset {preset!r}; choose one of {sorted(PRESETS)}")
    given = {
        "global_size": global_size,
        "local_size": local_size,
        "n_global": n_global,
        "n_local": n_local,
        "global_scale": global_scale,
        "local_scale": local_scale,
        "mean": mean,
        "std": std,
    }
    kwargs: dict[str, Any] = dict(PRESETS[preset])
    kwargs.update({k: v for k, v in given.items() if v is not None})
    kwargs.update(overrides)
    if preset == "digits":
        if global_size is not None and local_size is None:
            kwargs["local_size"] = max(1, global_size // 2)
        return DigitsMultiCrop(_make(DigitsMultiCropConfig, kwargs, preset))
    if global_size is not None and local_size is None:
        kwargs["local_size"] = max(1, round(global_size * _REFERENCE_LOCAL_SIZE / REFERENCE_SIZE))
    return MultiCropTransform(_make(MultiCropConfig, kwargs, preset))


def _make(cls: type, kwargs: dict[str, Any], preset: str) -> Any:
    try:
        return cls(**kwargs)
    except TypeError as err:
        fields = sorted(cls.__dataclass_fields__)
        raise ValueError(f"multi-crop preset {preset!r}: {err}; valid options are {fields}") from err
