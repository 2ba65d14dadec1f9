"""Named multi-crop presets (DINO, iBOT, DINOv2 crop counts and scales; a digits preset for the demo)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor

from ssl_vil.augment.digits import DigitsMultiCrop, DigitsMultiCropConfig
from ssl_vil.augment.multicrop import REFERENCE_SIZE, MultiCropConfig, MultiCropTransform


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
