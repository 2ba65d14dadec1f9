"""Stratified block / random masks and the multi-crop mask collate."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ssl_vil.config import ConfigError
from ssl_vil.objectives.masking import (
    BlockMaskGenerator,
    MaskingConfig,
    MultiCropMaskCollate,
    _UniformStream,
    mask_index_buffers,
    sample_masks,
)


def _samples(batch, n_global=2, n_local=3, size=32, local_size=16):
    """Views filled with a constant that encodes (sample, view), keys/labels unique per sample."""
    out = []
    for b in range(batch):
        views = [torch.full((3, size, size), 100.0 * b + v) for v in range(n_global)]
        views += [torch.full((3, local_size, local_size), 100.0 * b + n_global + v) for v in range(n_local)]
        out.append({"key": f"shard0/{b:04d}", "label": 10 + b, "views": views})
    return out


def test_collate_layout_is_view_major_and_keeps_identity():
    batch = _samples(5)
    out = MultiCropMaskCollate((8, 8), n_global=2)(batch, torch.Generator().manual_seed(0))
    assert out["keys"] == [f"shard0/{b:04d}" for b in range(5)]
    assert torch.equal(out["labels"], torch.arange(10, 15))
    assert out["global_crops"].shape == (10, 3, 32, 32) and out["local_crops"].shape == (15, 3, 16, 16)
    for v in range(2):
        for b in range(5):
            assert out["global_crops"][v * 5 + b].unique().tolist() == [100.0 * b + v]
    for v in range(3):
        for b in range(5):
            assert out["local_crops"][v * 5 + b].unique().tolist() == [100.0 * b + 2 + v]
    assert out["masks"].shape == (10, 64) and out["masks"].dtype == torch.bool
    no_local = MultiCropMaskCollate((8, 8), n_global=2)(_samples(3, n_local=0), torch.Generator().manual_seed(0))
    assert no_local["local_crops"] is None


def test_index_buffers_match_masks_and_have_static_size():
    collate = MultiCropMaskCollate((8, 8), n_global=2)
    sizes = set()
    for seed in range(20):
        out = collate(_samples(6), torch.Generator().manual_seed(seed))
        masks, idx, w, n = out["masks"], out["mask_indices"], out["mask_weights"], int(out["n_masked"])
        sizes.add(idx.shape[0])
        assert n == int(masks.sum()) and idx.dtype == torch.long and w.dtype == torch.float32
        assert torch.equal(idx[:n], masks.flatten().nonzero().flatten())
        assert torch.equal(idx[n:], torch.zeros_like(idx[n:])) and torch.equal(w[n:], torch.zeros_like(w[n:]))
        image = idx[:n] // 64
        counts = masks.sum(dim=1)
        torch.testing.assert_close(w[:n], 1.0 / counts[image].float())
        # Weights of each masked image sum to 1, so the iBOT loss is a per-image mean.
        torch.testing.assert_close(torch.zeros(12).index_add_(0, image, w[:n]), (counts > 0).float())
    # Upper bound = sum over the 6 masked images of int(64 * bin_max) with bins over linspace(0.1, 0.5, 7).
    expected = sum(int(64 * (0.1 + 0.4 * (i + 1) / 6)) for i in range(6))
    assert sizes == {expected}


def test_block_masks_hit_sample_fraction_and_ratio_range():
    gen = torch.Generator().manual_seed(0)
    block = BlockMaskGenerator((8, 8))
    ratios, positions = [], torch.zeros(16)
    n_batches = 300
    for _ in range(n_batches):
        masks, _ = sample_masks(16, gen, block, mask_probability=0.5, ratio_range=(0.1, 0.5))
        counts = masks.sum(dim=1)
        assert int((counts > 0).sum()) == 8  # int(16 * 0.5) images get a mask
        positions += (counts > 0).float()
        ratios += (counts[counts > 0] / 64.0).tolist()
    ratios = np.array(ratios)
    # Targets are int(64 * r); blocks may stop short of a target by less than a minimum block (4 patches).
    assert ratios.max() <= 0.5 and ratios.min() >= (int(64 * 0.1) - 3) / 64
    assert 0.27 < ratios.mean() < 0.31  # mean of U(0.1, 0.5) is 0.3
    # The shuffle spreads masked images over all batch positions (binomial(300, 0.5), 4.5 sigma).
    assert ((positions - 150).abs() <= 4.5 * np.sqrt(75)).all()


def test_random_masks_are_stratified_exactly():
    gen = torch.Generator().manual_seed(1)
    block = BlockMaskGenerator((10, 10))
    for _ in range(50):
        masks, upper = sample_masks(20, gen, block, mask_probability=0.25, ratio_range=(0.1, 0.5), mode="random")
        counts = sorted(int(c) for c in masks.sum(dim=1) if c > 0)
        assert len(counts) == 5
        for i, c in enumerate(counts):  # one image per bin of linspace(0.1, 0.5, 6)
            low, high = 0.1 + 0.08 * i, 0.1 + 0.08 * (i + 1)
            assert int(100 * low) <= c <= int(100 * high)
        assert int(masks.sum()) <= upper


def test_one_block_never_exceeds_the_cap():
    gen = torch.Generator().manual_seed(2)
    block = BlockMaskGenerator((12, 12), max_num_patches=9)
    for _ in range(200):
        mask = np.zeros((12, 12), dtype=bool)
        added = block._add_block(mask, 9, _UniformStream(gen))
        assert added == int(mask.sum()) <= 9
        full = block(72, gen)
        assert int(full.sum()) <= 72
    assert BlockMaskGenerator((8, 8)).max_num_patches == 32  # default cap 0.5 * N


def test_masks_depend_only_on_the_generator():
    collate = MultiCropMaskCollate((8, 8), n_global=2)
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = collate(_samples(4), torch.Generator().manual_seed(7))
    b = collate(_samples(4), torch.Generator().manual_seed(7))
    c = collate(_samples(4), torch.Generator().manual_seed(8))
    assert torch.equal(a["masks"], b["masks"]) and not torch.equal(a["masks"], c["masks"])
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1] and np.array_equal(np.random.get_state()[1], states[2])


def test_collate_errors_name_the_sample():
    collate = MultiCropMaskCollate((8, 8), n_global=2, n_local=3)
    bad = _samples(3)
    bad[1]["views"] = bad[1]["views"][:4]
    with pytest.raises(ValueError, match="shard0/0001.*expected 2 global \\+ 3 local views, got 4"):
        collate(bad, torch.Generator())
    bad = _samples(3)
    bad[2]["views"][1] = torch.zeros(3, 24, 24)
    with pytest.raises(ValueError, match="shard0/0002.*global view 1"):
        collate(bad, torch.Generator())
    with pytest.raises(ValueError, match="not divisible by the mask grid"):
        MultiCropMaskCollate((7, 7), n_global=2)(_samples(2), torch.Generator())
    with pytest.raises(ValueError, match="empty batch"):
        collate([], torch.Generator())


def test_index_buffer_rejects_too_small_bound():
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, :3] = True
    with pytest.raises(ValueError, match="exceed"):
        mask_index_buffers(masks, upper_bound=2)


def test_collate_from_config_equals_keyword_construction():
    cfg = MaskingConfig(mask_probability=0.75, mask_ratio=(0.2, 0.4), mode="random", min_num_patches=2)
    from_cfg = MultiCropMaskCollate.from_config((8, 8), 2, 3, cfg)
    direct = MultiCropMaskCollate((8, 8), 2, 3, mask_probability=0.75, mask_ratio=(0.2, 0.4), mode="random",
                                  min_num_patches=2)
    a = from_cfg(_samples(4), torch.Generator().manual_seed(3))
    b = direct(_samples(4), torch.Generator().manual_seed(3))
    assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["mask_indices"], b["mask_indices"])
    with pytest.raises(ConfigError, match=r"^mask_ratio: got \[0.6, 0.5\], expected \[min, max\]"):
        MaskingConfig(mask_ratio=(0.6, 0.5))
    with pytest.raises(ConfigError, match="^mode: got 'blocks'.*did you mean 'block'"):
        MaskingConfig(mode="blocks")
