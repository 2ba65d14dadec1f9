"""Masks for masked-patch self-distillation (iBOT / DINOv2), generated on CPU inside the collate function.

Block masks follow the BEiT / DINOv2 generator: rectangles of area U(min_num_patches, remaining) and aspect
ratio log-U(min_aspect, max_aspect) are added until the target count is reached (each block adds at most
``max_num_patches`` new patches; a block that cannot be placed in ``max_attempts`` tries ends the mask, so a
mask may fall short of its target but never exceeds it).

Per batch of n global images, ``int(n * mask_probability)`` images are masked. Their ratios are stratified
as in DINOv2: [ratio_min, ratio_max] is cut into one bin per masked image, each image draws U(bin), and the
masks are shuffled over the batch. The number of masked patches is bounded by
``sum_i int(S * bin_max_i)``, a function of n only, which sizes the static index buffers.

All randomness comes from the ``torch.Generator`` passed in, never from global RNGs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid

if TYPE_CHECKING:
    from ssl_vil.data.collate import StackedSamples

MaskMode = Literal["block", "random"]
MASK_MODES: tuple[str, ...] = get_args(MaskMode)


@dataclass(kw_only=True, slots=True)
class MaskingConfig(Config):
    """Student masks of the global crops (used when the objective's ``ibot_weight`` > 0); the run config's
    ``masking:`` section. The fields are the keyword arguments of :class:`MultiCropMaskCollate`.

    Attributes:
        mask_probability: fraction of the global crops of a batch that are masked.
        mask_ratio: [min, max] masked fraction of a masked crop's patches (stratified over the batch).
        mode: "block" (BEiT / DINOv2 block masks) or "random" patches.
        min_num_patches: smallest block area proposed (block mode).
        max_block_fraction: most new patches one block may add, as a fraction of the grid (block mode).
        min_aspect: smallest block aspect ratio; the largest is its inverse (block mode).
        max_attempts: placements tried per block before a mask ends short of its target (block mode).
    """

    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mode: MaskMode = "block"
    min_num_patches: int = 4
    max_block_fraction: float = 0.5
    min_aspect: float = 0.3
    max_attempts: int = 10

    def validate(self) -> None:
        if not 0.0 <= self.mask_probability <= 1.0:
            raise invalid("mask_probability", self.mask_probability, "a probability in [0, 1]")
        low, high = self.mask_ratio
        if not 0.0 <= low <= high <= 1.0:
            raise invalid("mask_ratio", list(self.mask_ratio), "[min, max] with 0 <= min <= max <= 1")
        if self.min_num_patches < 1:
            raise invalid("min_num_patches", self.min_num_patches, "a positive integer")
        if not 0.0 < self.max_block_fraction <= 1.0:
            raise invalid("max_block_fraction", self.max_block_fraction, "a fraction in (0, 1]")
        if not 0.0 < self.min_aspect <= 1.0:
            raise invalid("min_aspect", self.min_aspect, "an aspect ratio in (0, 1]")
        if self.max_attempts < 1:
            raise invalid("max_attempts", self.max_attempts, "a positive integer")


class _UniformStream:
    """U[0, 1) doubles drawn from a ``torch.Generator`` in chunks.

    Block placement needs many scalar draws; one generator call per chunk instead of per draw makes them
    cheap in Python while the masks remain a pure function of the generator state.
    """

    def __init__(self, generator: torch.Generator, chunk: int = 1024) -> None:
        self.generator = generator
        self.chunk = chunk
        self._buffer: list[float] = []
        self._position = 0

    def next(self) -> float:
        if self._position == len(self._buffer):
            self._buffer = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist()
            self._position = 0
        u = self._buffer[self._position]
        self._position += 1
        return u

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.next()

    def randint(self, low: int, high_inclusive: int) -> int:
        span = high_inclusive - low + 1
        return low + min(int(self.next() * span), span - 1)


class BlockMaskGenerator:
    """Draws BEiT-style block masks on a (h, w) patch grid.

    Args:
        grid_hw: patch grid (h, w).
        min_num_patches: smallest block area that is proposed.
        max_num_patches: most new patches one block may add (default 0.5 * h * w, as DINOv2).
        min_aspect: smallest block aspect ratio; the largest defaults to 1 / min_aspect.
        max_aspect: largest block aspect ratio.
        max_attempts: placements tried per block before giving up.
    """

    def __init__(
        self,
        grid_hw: tuple[int, int],
        *,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ) -> None:
        self.height, self.width = (int(v) for v in grid_hw)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"mask grid must be positive, got {grid_hw!r}")
        n_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = int(0.5 * n_patches) if max_num_patches is None else max_num_patches
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def _add_block(self, mask: np.ndarray, max_new: int, stream: _UniformStream) -> int:
        """Try to add one block adding 1..max_new patches; returns the number of patches added."""
        for _ in range(self.max_attempts):
            area = stream.uniform(self.min_num_patches, max_new)
            aspect = math.exp(stream.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.height and 0 < w < self.width:
                top = stream.randint(0, self.height - h)
                left = stream.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_new:
                    window[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, generator: torch.Generator) -> Tensor:
        """Block mask (h, w) bool with at most ``num_masking_patches`` True entries."""
        return torch.from_numpy(self._generate(num_masking_patches, _UniformStream(generator)))

    def _generate(self, num_masking_patches: int, stream: _UniformStream) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_new = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, max_new, stream)
            if added == 0:
                break
            count += added
        return mask


def random_mask(grid_hw: tuple[int, int], num_masking_patches: int, generator: torch.Generator) -> Tensor:
    """Mask (h, w) with exactly ``num_masking_patches`` uniformly chosen patches."""
    n = grid_hw[0] * grid_hw[1]
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=generator)[:num_masking_patches]] = True
    return flat.reshape(grid_hw)


def sample_masks(
    n_images: int,
    generator: torch.Generator,
    block_generator: BlockMaskGenerator,
    *,
    mask_probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    mode: str = "block",
) -> tuple[Tensor, int]:
    """Stratified masks for ``n_images`` images.

    Returns:
        masks: (n_images, S) bool, S = h * w of ``block_generator``.
        upper_bound: an upper bound on ``masks.sum()`` that depends on ``n_images`` only.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    grid = (block_generator.height, block_generator.width)
    n_patches = block_generator.num_patches
    n_masked_images = int(n_images * mask_probability)
    low, high = ratio_range
    masks = np.zeros((n_images, n_patches), dtype=bool)
    stream = _UniformStream(generator)
    upper_bound = 0
    for i in range(n_masked_images):
        bin_low = low + (high - low) * i / n_masked_images
        bin_high = low + (high - low) * (i + 1) / n_masked_images
        target = int(n_patches * stream.uniform(bin_low, bin_high))
        if mode == "block":
            masks[i] = block_generator._generate(target, stream).reshape(-1)
        else:
            masks[i] = random_mask(grid, target, generator).flatten().numpy()
        upper_bound += int(n_patches * bin_high)
    shuffled = torch.from_numpy(masks)[torch.randperm(n_images, generator=generator)]
    return shuffled, upper_bound


def mask_index_buffers(masks: Tensor, upper_bound: int) -> tuple[Tensor, Tensor, Tensor]:
    """Static-size gather buffers for masks (N, S) bool.

    Returns:
        mask_indices: (upper_bound,) int64 flat indices into the (N * S) token rows; padding = 0.
        mask_weights: (upper_bound,) fp32, 1 / (masked patches of the row's image); padding = 0.
        n_masked: () int64, number of valid (non-padding) entries = masks.sum().
    """
    flat = masks.flatten().nonzero().flatten()
    n_masked = flat.numel()
    if n_masked > upper_bound:
        raise ValueError(f"{n_masked} masked patches exceed the index buffer size {upper_bound}")
    per_image = masks.sum(dim=1).clamp(min=1).to(torch.float32)
    weights = (1.0 / per_image)[:, None].expand_as(masks)[masks]
    mask_indices = torch.zeros(upper_bound, dtype=torch.long)
    mask_weights = torch.zeros(upper_bound, dtype=torch.float32)
    mask_indices[:n_masked] = flat
    mask_weights[:n_masked] = weights
    return mask_indices, mask_weights, torch.tensor(n_masked, dtype=torch.long)


class MultiCropMaskCollate:
    """Collates multi-crop samples and draws masks for the global crops.

    Called as ``collate(samples, generator)``; each sample is ``{"key": str, "label": int, "views":
    list[Tensor]}`` with ``n_global`` global views (3, H, W) followed by the local views (3, h, w).

    Returns a dict (B = len(samples), S = h_grid * w_grid, U = static index-buffer size):
        keys: list[str] of length B.
        labels: (B,) int64.
        global_crops: (n_global * B, 3, H, W), view-major (row v * B + b = view v of sample b).
        local_crops: (n_local * B, 3, h, w) view-major, or None without local views.
        masks: (n_global * B, S) bool, True = patch replaced by the mask token in the student.
        mask_indices: (U,) int64 flat indices into the (n_global * B * S) global-crop tokens; padding = 0.
        mask_weights: (U,) fp32, 1 / (masked patches of that image); padding = 0.
        n_masked: () int64, number of valid entries in the index buffers (= masks.sum()).
        U depends only on B (and the mask settings), so shapes are static for a fixed batch size.
    """

    def __init__(
        self,
        grid_hw: tuple[int, int],
        n_global: int,
        n_local: int | None = None,
        *,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mode: str = "block",
        min_num_patches: int = 4,
        max_block_fraction: float = 0.5,
        min_aspect: float = 0.3,
        max_attempts: int = 10,
    ) -> None:
        if n_global < 1:
            raise ValueError(f"n_global must be >= 1, got {n_global}")
        if not 0.0 <= mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
        if not 0.0 <= mask_ratio[0] <= mask_ratio[1] <= 1.0:
            raise ValueError(f"mask_ratio must satisfy 0 <= min <= max <= 1, got {mask_ratio}")
        if mode not in MASK_MODES:
            raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.n_global = n_global
        self.n_local = n_local
        self.mask_probability = mask_probability
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.mode = mode
        n_patches = self.grid_hw[0] * self.grid_hw[1]
        self.block_generator = BlockMaskGenerator(
            self.grid_hw,
            min_num_patches=min_num_patches,
            max_num_patches=int(max_block_fraction * n_patches),
            min_aspect=min_aspect,
            max_attempts=max_attempts,
        )

    @classmethod
    def from_config(
        cls, grid_hw: tuple[int, int], n_global: int, n_local: int | None, cfg: MaskingConfig
    ) -> MultiCropMaskCollate:
        """The collate for a ``grid_hw`` patch grid with the masks described by ``cfg``."""
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        return cls(grid_hw, n_global, n_local, **fields)

    def __call__(self, samples: Sequence[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        if len(samples) == 0:
            raise ValueError("MultiCropMaskCollate got an empty batch")
        n_local = self._check_samples(samples)
        global_crops = torch.stack([s["views"][v] for v in range(self.n_global) for s in samples])
        local_crops = None
        if n_local > 0:
            first = self.n_global
            local_crops = torch.stack([s["views"][v] for v in range(first, first + n_local) for s in samples])
        return self._with_masks([str(s["key"]) for s in samples], [int(s["label"]) for s in samples], global_crops,
                                local_crops, generator)

    def collate_stacked(self, stacked: StackedSamples, generator: torch.Generator) -> dict[str, Any]:
        """The same batch as ``self(stacked.samples(), generator)``, concatenated from the workers' stacked parts
        (one copy per crop size). Views that do not fit go through the per-sample path, whose error names the
        sample."""
        views = stacked.parts[0]
        n_local = self.n_local if self.n_local is not None else len(views) - self.n_global
        fits = (len(views) == self.n_global + n_local and n_local >= 0 and all(t.dim() == 4 for t in views)
                and len({t.shape for t in views[:self.n_global]}) == 1
                and len({t.shape[1:] for t in views[self.n_global:]}) <= 1)
        if not fits:
            return self(stacked.samples(), generator)
        global_crops = torch.cat([part[v] for v in range(self.n_global) for part in stacked.parts])
        local_crops = None
        if n_local > 0:
            local_crops = torch.cat([part[v] for v in range(self.n_global, len(views)) for part in stacked.parts])
        return self._with_masks([str(k) for k in stacked.keys], [int(lab) for lab in stacked.labels], global_crops,
                                local_crops, generator)

    def _with_masks(self, keys: list[str], labels: list[int], global_crops: Tensor, local_crops: Tensor | None,
                    generator: torch.Generator) -> dict[str, Any]:
        batch = len(keys)
        masks, upper_bound = sample_masks(
            self.n_global * batch,
            generator,
            self.block_generator,
            mask_probability=self.mask_probability,
            ratio_range=self.mask_ratio,
            mode=self.mode,
        )
        mask_indices, mask_weights, n_masked = mask_index_buffers(masks, upper_bound)
        return {
            "keys": keys,
            "labels": torch.tensor(labels, dtype=torch.long),
            "global_crops": global_crops,
            "local_crops": local_crops,
            "masks": masks,
            "mask_indices": mask_indices,
            "mask_weights": mask_weights,
            "n_masked": n_masked,
        }

    def _check_samples(self, samples: Sequence[dict[str, Any]]) -> int:
        """Validate keys, view counts and shapes; returns the number of local views."""
        n_local = self.n_local
        global_shape = local_shape = None
        for s in samples:
            key = s.get("key", "<missing key>") if isinstance(s, dict) else "<not a dict>"
            if not isinstance(s, dict) or not {"key", "label", "views"} <= s.keys():
                raise ValueError(f"sample {key!r}: expected a dict with 'key', 'label' and 'views'")
            views = s["views"]
            expected = self.n_global + (n_local if n_local is not None else len(views) - self.n_global)
            if len(views) < self.n_global or len(views) != expected:
                raise ValueError(
                    f"sample {key!r}: expected {self.n_global} global + "
                    f"{n_local if n_local is not None else 'the same number of'} local views, got {len(views)} views"
                )
            if n_local is None:
                n_local = len(views) - self.n_global
            for v, view in enumerate(views):
                shape = tuple(view.shape)
                if len(shape) != 3:
                    raise ValueError(f"sample {key!r}: view {v} must be (C, H, W), got {shape}")
                if v < self.n_global:
                    global_shape = global_shape or shape
                    if shape != global_shape:
                        raise ValueError(f"sample {key!r}: global view {v} has shape {shape}, expected {global_shape}")
                else:
                    local_shape = local_shape or shape
                    if shape != local_shape:
                        raise ValueError(f"sample {key!r}: local view {v} has shape {shape}, expected {local_shape}")
        assert global_shape is not None and n_local is not None
        gh, gw = self.grid_hw
        if global_shape[1] % gh or global_shape[2] % gw:
            raise ValueError(
                f"global crops {global_shape[1]}x{global_shape[2]} are not divisible by the mask grid {gh}x{gw}"
            )
        return n_local
