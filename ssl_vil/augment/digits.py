"""Multi-crop augmentation for small grayscale digit images (the embedded CPU demo).

Digits are not flip-invariant and have no colour, so flips and colour jitter are replaced by geometric
and intensity noise. Per view, one ``grid_sample`` (bilinear, zero padding) on the [0, 1] image applies a
random resized crop (aspect log-U(3/4, 4/3)), rotation, shear and a smooth elastic warp (a 4×4 grid of
N(0, elastic_std) displacements, bicubically upsampled); then with ``blur_prob`` the view is blended with
its 5×5-binomial blur (weight U(0, 1)), multiplied by a gain, given Gaussian noise of std U(0, noise_max),
clamped to [0, clamp_max] and normalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor

from ssl_vil.augment import sampling

_ELASTIC_GRID = 4
_BINOMIAL_5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


@dataclass(kw_only=True, slots=True)
class DigitsMultiCropConfig:
    """Settings of a :class:`DigitsMultiCrop` (sizes in output pixels, angles in degrees)."""

    global_size: int = 32
    local_size: int = 16
    n_global: int = 2
    n_local: int = 4
    global_scale: tuple[float, float] = (0.5, 1.0)
    local_scale: tuple[float, float] = (0.2, 0.5)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    rotation_deg: float = 15.0
    shear_deg: float = 10.0
    elastic_std: float = 0.04
    blur_prob: float = 0.5
    gain: tuple[float, float] = (0.7, 1.3)
    noise_max: float = 0.05
    clamp_max: float = 1.5
    mean: tuple[float, ...] = (0.30, 0.30, 0.30)
    std: tuple[float, ...] = (0.40, 0.40, 0.40)

    def __post_init__(self) -> None:
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {self.n_global}, {self.n_local}")
        for name in ("global_scale", "local_scale", "ratio", "gain"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"DigitsMultiCropConfig.{name} must satisfy 0 < low <= high, got {(low, high)}")
        if not 0.0 <= self.blur_prob <= 1.0:
            raise ValueError(f"DigitsMultiCropConfig.blur_prob must be a probability, got {self.blur_prob}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"mean/std must have equal length and positive std, got {self.mean}, {self.std}")


@dataclass(frozen=True, slots=True)
class DigitsViewParams:
    """Every random decision for one digits view."""

    kind: str
    size: int
    center: tuple[float, float]  # crop centre (x, y) in normalised [-1, 1] image coordinates
    half_extent: tuple[float, float]  # crop half width / height in normalised coordinates
    rotation_deg: float
    shear_deg: float
    elastic: Tensor  # (2, 4, 4) displacements in normalised coordinates
    blur: bool
    blur_weight: float
    gain: float
    noise_std: float
    noise: Tensor  # (1, size, size) standard normal, scaled by noise_std


@dataclass(frozen=True, slots=True)
class DigitsParams:
    views: tuple[DigitsViewParams, ...]


class DigitsMultiCrop:
    """``transform(image, generator) -> [global_1, ..., local_1, ...]`` normalised (3, S, S) fp32 tensors."""

    def __init__(self, cfg: DigitsMultiCropConfig) -> None:
        self.cfg = cfg

    def sample_params(self, generator: torch.Generator, image_size: tuple[int, int] | None = None) -> DigitsParams:
        """Draw all random decisions (crops are in normalised coordinates, so the size is not needed)."""
        cfg = self.cfg
        views = []
        for v in range(cfg.n_global + cfg.n_local):
            is_global = v < cfg.n_global
            views.append(
                self._sample_view(
                    generator,
                    kind="global" if is_global else "local",
                    size=cfg.global_size if is_global else cfg.local_size,
                    scale=cfg.global_scale if is_global else cfg.local_scale,
                )
            )
        return DigitsParams(views=tuple(views))

    def _sample_view(self, g: torch.Generator, *, kind: str, size: int, scale: tuple[float, float]) -> DigitsViewParams:
        cfg = self.cfg
        area = sampling.uniform(g, *scale)
        aspect = math.exp(sampling.uniform(g, math.log(cfg.ratio[0]), math.log(cfg.ratio[1])))
        half_w = min(1.0, math.sqrt(area * aspect))
        half_h = min(1.0, math.sqrt(area / aspect))
        cx = sampling.uniform(g, -1.0 + half_w, 1.0 - half_w)
        cy = sampling.uniform(g, -1.0 + half_h, 1.0 - half_h)
        rotation = sampling.uniform(g, -cfg.rotation_deg, cfg.rotation_deg)
        shear = sampling.uniform(g, -cfg.shear_deg, cfg.shear_deg)
        elastic = torch.randn((2, _ELASTIC_GRID, _ELASTIC_GRID), generator=g) * cfg.elastic_std
        blur = sampling.bernoulli(g, cfg.blur_prob)
        blur_weight = sampling.uniform(g, 0.0, 1.0)
        gain = sampling.uniform(g, *cfg.gain)
        noise_std = sampling.uniform(g, 0.0, cfg.noise_max)
        noise = torch.randn((1, size, size), generator=g)
        return DigitsViewParams(
            kind=kind,
            size=size,
            center=(cx, cy),
            half_extent=(half_w, half_h),
            rotation_deg=rotation,
            shear_deg=shear,
            elastic=elastic,
            blur=blur,
            blur_weight=blur_weight,
            gain=gain,
            noise_std=noise_std,
            noise=noise,
        )

    def apply(self, image: Image.Image | Tensor, params: DigitsParams) -> list[Tensor]:
        """Render the views described by ``params`` (deterministic). Views of one size are rendered as one batch
        (a view's pixels do not depend on the others in its batch)."""
        x = _to_float_tensor(image)
        out: list[Tensor | None] = [None] * len(params.views)
        for size in dict.fromkeys(p.size for p in params.views):
            index = [i for i, p in enumerate(params.views) if p.size == size]
            for i, view in zip(index, self._apply_views(x, [params.views[i] for i in index])):
                out[i] = view
        return out  # type: ignore[return-value]

    def _apply_views(self, x: Tensor, views: list[DigitsViewParams]) -> Tensor:
        """(n, 3, S, S) for n views of one size S."""
        cfg = self.cfg
        n, size = len(views), views[0].size
        theta = torch.stack([_affine_matrix(p) for p in views])
        grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
        warp = F.interpolate(torch.stack([p.elastic for p in views]), size=(size, size), mode="bicubic",
                             align_corners=True)
        grid = grid + warp.permute(0, 2, 3, 1)
        y = F.grid_sample(x[None].expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
        blurred = [i for i, p in enumerate(views) if p.blur]
        if blurred:
            keep = _per_view([1.0 - views[i].blur_weight for i in blurred])
            mix = _per_view([views[i].blur_weight for i in blurred])
            y[blurred] = keep * y[blurred] + mix * _binomial_blur(y[blurred])
        y = y * _per_view([p.gain for p in views]) + _per_view([p.noise_std for p in views]) * torch.stack(
            [p.noise for p in views])
        y = y.clamp(0.0, cfg.clamp_max)
        # What TF.normalize computes (sub, then div, per channel); broadcasting a grayscale view against the
        # 3-channel mean writes the RGB result once, without first copying the channel three times.
        channels = len(cfg.mean)
        mean = torch.tensor(cfg.mean, dtype=y.dtype).view(1, channels, 1, 1)
        std = torch.tensor(cfg.std, dtype=y.dtype).view(1, channels, 1, 1)
        return (y - mean) / std

    def __call__(self, image: Image.Image | Tensor, generator: torch.Generator) -> list[Tensor]:
        return self.apply(image, self.sample_params(generator))


def _affine_matrix(p: DigitsViewParams) -> Tensor:
    """2×3 matrix mapping output coordinates in [-1, 1] to input coordinates: centre + R · Sh · diag(extent)."""
    angle = math.radians(p.rotation_deg)
    shear = math.tan(math.radians(p.shear_deg))
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shear_m = torch.tensor([[1.0, shear], [0.0, 1.0]])
    extent = torch.diag(torch.tensor(p.half_extent))
    linear = rotation @ shear_m @ extent
    return torch.cat([linear, torch.tensor(p.center)[:, None]], dim=1).to(torch.float32)


def _binomial_blur(x: Tensor) -> Tensor:
    """5×5 binomial blur of (N, C, H, W) with replicate padding."""
    kernel = torch.outer(_BINOMIAL_5, _BINOMIAL_5).to(x.dtype)
    c = x.shape[1]
    weight = kernel.expand(c, 1, 5, 5)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    return F.conv2d(padded, weight, groups=c)


def _per_view(values: list[float]) -> Tensor:
    """(n, 1, 1, 1) fp32: one scalar per view, rounded to fp32 as a Python scalar times a tensor would be."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)


def _to_float_tensor(image: Image.Image | Tensor) -> Tensor:
    """PIL image or uint8/float tensor -> fp32 (1|3, H, W) in [0, 1]; grayscale (also as equal R, G, B) is one
    channel."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        t = TF.pil_to_tensor(image)
    else:
        t = image
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (1|3, H, W), got shape {tuple(t.shape)}")
    if t.shape[0] == 3 and torch.equal(t[0], t[1]) and torch.equal(t[1], t[2]):
        t = t[:1]  # gray stored as RGB: every op below is per channel, so one channel gives the same views
    if t.dtype == torch.uint8:
        return t.to(torch.float32) / 255.0
    return t.to(torch.float32)
