"""Named multi-crop presets (DINO, iBOT, DINOv2 crop counts and scales; a digits preset for the demo)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import torch
from PIL import Image
from torch import Tensor

from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid

if TYPE_CHECKING:  # the transforms (torchvision) load when one is built, not when a config is checked
    from ssl_vil.augment.digits import DigitsMultiCrop
    from ssl_vil.augment.multicrop import MultiCropTransform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Preset = Literal["dino", "ibot", "dinov2", "digits"]


class MultiCrop(Protocol):
    """Augmentation contract of the data stream: all randomness comes from ``generator``."""

    def __call__(self, image: Image.Image, generator: torch.Generator) -> list[Tensor]: ...

    def sample_params(self, generator: torch.Generator, image_size: tuple[int, int]) -> Any: ...

    def apply(self, image: Image.Image, params: Any) -> list[Tensor]: ...


# The papers' settings at their reference resolution (224 px global, 96 px local crops): DINO, iBOT (its
# released ViT-S/B arguments) and DINOv2 share flips, colour jitter, grayscale, blur and solarization and
# differ only in the crop counts and scales. "digits" is the demo's grayscale-digit family (32 / 16 px).
PRESETS: dict[str, dict[str, Any]] = {
    "dino": {"global_size": 224, "local_size": 96, "n_global": 2, "n_local": 8,
             "global_scale": (0.4, 1.0), "local_scale": (0.05, 0.4), "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "ibot": {"global_size": 224, "local_size": 96, "n_global": 2, "n_local": 10,
             "global_scale": (0.25, 1.0), "local_scale": (0.05, 0.25), "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "dinov2": {"global_size": 224, "local_size": 96, "n_global": 2, "n_local": 8,
               "global_scale": (0.32, 1.0), "local_scale": (0.05, 0.32), "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "digits": {"global_size": 32, "local_size": 16, "n_global": 2, "n_local": 4,
               "global_scale": (0.5, 1.0), "local_scale": (0.2, 0.5), "mean": (0.30, 0.30, 0.30),
               "std": (0.40, 0.40, 0.40)},
}
assert set(PRESETS) == set(get_args(Preset))
# Fields of AugmentConfig that a preset fills when the config leaves them null (local_size: scaled, see below).
PRESET_FIELDS = ("n_global", "n_local", "global_scale", "local_scale", "mean", "std")


def scaled_local_size(preset: str, global_size: int, multiple_of: int = 1) -> int:
    """The preset's local crop size at ``global_size``: its local / global size ratio (96 / 224 for the DINO
    family, 1 / 2 for "digits") times ``global_size``, rounded to the nearest multiple of ``multiple_of``
    (the patch size, so the local crop is a whole token grid) and at least ``multiple_of``."""
    values = PRESETS[preset]
    exact = global_size * values["local_size"] / values["global_size"]
    return max(multiple_of, round(exact / multiple_of) * multiple_of)


@dataclass(kw_only=True, slots=True)
class AugmentConfig(Config):
    """The multi-crop views of pretraining; the run config's ``data.augment:`` section.

    ``preset`` picks the transform family (DINO-style colour augmentations, or "digits" for the demo) and the
    values of every field left null: crop counts and scales (:data:`PRESETS`), mean / std, and ``local_size``
    (the preset's local / global size ratio times ``global_size``, a multiple of ``model.patch_size`` in a run
    config). Explicitly stated values win. A run config resolves them when it is built, so ``RUN/config.yaml``
    holds the numbers that were used. Sizes are in pixels of the network input. ``blur``: "dino" applies blur
    with p = 1.0 / 0.1 / 0.5 (first global / other globals / locals), as the DINO, iBOT and DINOv2 papers
    describe; "dinov2" reproduces the released DINOv2 code's inverted 0.0 / 0.9 / 0.5 (ignored by "digits").
    """

    preset: Preset = "dinov2"
    global_size: int = 224
    local_size: int | None = None
    n_global: int | None = None
    n_local: int | None = None
    global_scale: tuple[float, float] | None = None
    local_scale: tuple[float, float] | None = None
    blur: Literal["dino", "dinov2"] = "dino"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def validate(self) -> None:
        # Null fields are still to be filled from the preset (resolve_preset); only stated values are checked.
        if self.global_size <= 0:
            raise invalid("global_size", self.global_size, "a positive integer")
        if self.n_global is not None and self.n_global <= 0:
            raise invalid("n_global", self.n_global, "a positive integer")
        if self.n_local is not None and self.n_local < 0:
            raise invalid("n_local", self.n_local, "a non-negative integer")
        if self.local_size is not None and self.local_size <= 0 and (self.n_local is None or self.n_local > 0):
            raise invalid("local_size", self.local_size, "a positive integer")
        for name in ("global_scale", "local_scale"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value[0] <= value[1] <= 1.0:
                raise invalid(name, list(value), "[min, max] with 0 < min <= max <= 1")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise invalid("std", list(self.std), "positive values")

    def resolve_preset(self, patch_size: int = 1) -> AugmentConfig:
        """Fill every null field from the preset, in place (stated values are kept); returns ``self``.

        ``patch_size``: the local crop size derived from ``global_size`` is rounded to a multiple of it.
        """
        values = PRESETS[self.preset]
        for name in PRESET_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, values[name])
        if self.local_size is None:
            self.local_size = scaled_local_size(self.preset, self.global_size, patch_size)
        self.validate()
        return self

    @property
    def is_resolved(self) -> bool:
        """True when no field waits for the preset."""
        return all(getattr(self, name) is not None for name in (*PRESET_FIELDS, "local_size"))


def multicrop_from_config(cfg: AugmentConfig) -> MultiCropTransform | DigitsMultiCrop:
    """The multi-crop transform ``cfg`` describes (null fields take the preset's values; ``cfg`` is not changed)."""
    if not cfg.is_resolved:
        cfg = replace(cfg).resolve_preset()
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

    Arguments left as None take the preset's value (:data:`PRESETS`). Without ``local_size``, local crops keep
    the preset's local / global size ratio (the papers' 96 / 224, or 1 / 2 for "digits"; rounded). Further
    keyword arguments are fields of :class:`MultiCropConfig` (or :class:`DigitsMultiCropConfig` for "digits"),
    e.g. ``blur_probs``, ``dinov2_blur_bug``, ``jitter_strength``, ``solarize_prob``.
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
    if global_size is not None and local_size is None:
        kwargs["local_size"] = scaled_local_size(preset, global_size)
    if preset == "digits":
        from ssl_vil.augment.digits import DigitsMultiCrop, DigitsMultiCropConfig

        return DigitsMultiCrop(_make(DigitsMultiCropConfig, kwargs, preset))
    from ssl_vil.augment.multicrop import MultiCropConfig, MultiCropTransform

    return MultiCropTransform(_make(MultiCropConfig, kwargs, preset))


def _make(cls: type, kwargs: dict[str, Any], preset: str) -> Any:
    try:
        return cls(**kwargs)
    except TypeError as err:
        fields = sorted(cls.__dataclass_fields__)
        raise ValueError(f"multi-crop preset {preset!r}: {err}; valid options are {fields}") from err
