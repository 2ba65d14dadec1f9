"""Multi-crop presets: measured probabilities, generator-only randomness, parameter semantics, sizes."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vil.augment import build_multicrop

N_DRAWS = 2000


def _image(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _assert_rate(hits: int, n: int, p: float, what: str) -> None:
    if p in (0.0, 1.0):
        assert hits == round(n * p), f"{what}: {hits}/{n}, expected probability {p}"
        return
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) <= 4.5 * sigma, f"{what}: {hits}/{n}, expected {n * p:.0f} +- {4.5 * sigma:.0f}"


def _draws(transform, n=N_DRAWS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [transform.sample_params(gen, (48, 40)).views for _ in range(n)]


@pytest.mark.parametrize(
    ("bug", "blur"), [(False, (1.0, 0.1, 0.5)), (True, (0.0, 0.9, 0.5))], ids=["dino-blur", "dinov2-blur-bug"]
)
def test_sampled_probabilities_match_configuration(bug, blur):
    transform = build_multicrop("dinov2", global_size=32, local_size=16, n_local=2, dinov2_blur_bug=bug)
    draws = _draws(transform)
    for v, role in enumerate(["global 1", "global 2", "local 1", "local 2"]):
        views = [d[v] for d in draws]
        _assert_rate(sum(p.flip for p in views), N_DRAWS, 0.5, f"{role} flip")
        _assert_rate(sum(p.jitter for p in views), N_DRAWS, 0.8, f"{role} jitter")
        _assert_rate(sum(p.gray for p in views), N_DRAWS, 0.2, f"{role} gray")
        _assert_rate(sum(p.blur for p in views), N_DRAWS, blur[min(v, 2)], f"{role} blur")
        _assert_rate(sum(p.solarize for p in views), N_DRAWS, 0.2 if v == 1 else 0.0, f"{role} solarize")


def test_custom_probabilities_are_honoured():
    transform = build_multicrop(
        "dino", global_size=32, local_size=16, n_local=1, flip_prob=0.0, gray_prob=0.7, blur_probs=(0.3, 0.6, 0.9)
    )
    draws = _draws(transform, seed=1)
    for v, blur in enumerate((0.3, 0.6, 0.9)):
        _assert_rate(sum(d[v].flip for d in draws), N_DRAWS, 0.0, "flip")
        _assert_rate(sum(d[v].gray for d in draws), N_DRAWS, 0.7, "gray")
        _assert_rate(sum(d[v].blur for d in draws), N_DRAWS, blur, "blur")


def test_jitter_strength_applies_to_both_global_views():
    transform = build_multicrop("dino", global_size=32, local_size=16, n_local=1, jitter_strength=2.0)
    draws = _draws(transform, n=500)
    for v in range(3):
        brightness = [d[v].jitter_factors[0] for d in draws]
        # Strength 2 widens brightness from (0.6, 1.4) to (0.2, 1.8) on every view.
        assert min(brightness) < 0.45 and max(brightness) > 1.55, f"view {v}: {min(brightness)}..{max(brightness)}"
        assert 0.2 <= min(brightness) and max(brightness) <= 1.8


def test_crop_boxes_respect_scale_and_ratio():
    transform = build_multicrop("ibot", global_size=32, local_size=16, n_local=2)
    area = 48 * 40
    for views in _draws(transform, n=300):
        for p in views:
            top, left, h, w = p.crop
            assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 48
            low, high = (0.25, 1.0) if p.kind == "global" else (0.05, 0.25)
            # Rounding of h and w moves the area by at most (h + w) pixels.
            assert low * area - (h + w) <= h * w <= high * area + (h + w)


def test_transform_uses_only_the_passed_generator():
    transform = build_multicrop("dinov2", global_size=32, local_size=16, n_local=2)
    image = _image()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = transform(image, torch.Generator().manual_seed(3))
    b = transform(image, torch.Generator().manual_seed(3))
    c = transform(image, torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert [tuple(v.shape) for v in a] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2


def _with(params, index, **changes):
    views = list(params.views)
    views[index] = type(views[index])(**{**{f: getattr(views[index], f) for f in views[index].__slots__}, **changes})
    return type(params)(views=tuple(views))


def test_apply_follows_the_sampled_decisions():
    transform = build_multicrop("dino", global_size=32, local_size=16, n_local=1)
    mean = torch.tensor(transform.cfg.mean)[:, None, None]
    std = torch.tensor(transform.cfg.std)[:, None, None]
    image = _image(1)
    params = transform.sample_params(torch.Generator().manual_seed(0), image.size)
    plain = _with(params, 0, flip=False, jitter=False, gray=False, blur=False, solarize=False)
    base = transform.apply(image, plain)[0] * std + mean
    flipped = transform.apply(image, _with(plain, 0, flip=True))[0] * std + mean
    torch.testing.assert_close(flipped, base.flip(-1))
    solarized = transform.apply(image, _with(plain, 0, solarize=True))[0] * std + mean
    torch.testing.assert_close(solarized, torch.where(base >= 128 / 255, 1.0 - base, base), atol=1e-6, rtol=0)
    gray = transform.apply(image, _with(plain, 0, gray=True))[0] * std + mean
    torch.testing.assert_close(gray[0], gray[1])
    torch.testing.assert_close(gray[1], gray[2])
    blurred = transform.apply(image, _with(plain, 0, blur=True, blur_sigma=1.0))[0] * std + mean
    assert blurred.diff(dim=-1).abs().mean() < 0.8 * base.diff(dim=-1).abs().mean()


def test_preset_sizes_and_counts():
    dino = build_multicrop("dino")
    assert (dino.cfg.global_size, dino.cfg.local_size, dino.cfg.n_global, dino.cfg.n_local) == (224, 96, 2, 8)
    assert (dino.cfg.global_scale, dino.cfg.local_scale) == ((0.4, 1.0), (0.05, 0.4))
    ibot = build_multicrop("ibot")
    assert (ibot.cfg.n_local, ibot.cfg.global_scale, ibot.cfg.local_scale) == (10, (0.25, 1.0), (0.05, 0.25))
    v2 = build_multicrop("dinov2", global_size=112)
    assert (v2.cfg.local_size, v2.cfg.global_scale, v2.cfg.local_scale) == (48, (0.32, 1.0), (0.05, 0.32))
    assert v2.cfg.effective_blur_sigma() == pytest.approx((0.05, 1.0))
    with pytest.raises(ValueError, match="unknown multi-crop preset 'simclr'"):
        build_multicrop("simclr")
    with pytest.raises(ValueError, match="valid options are"):
        build_multicrop("dino", blur_prob=0.3)


def test_digits_preset():
    transform = build_multicrop("digits")
    cfg = transform.cfg
    assert (cfg.global_size, cfg.local_size, cfg.n_global, cfg.n_local) == (32, 16, 2, 4)
    draws = [transform.sample_params(g).views for g in [torch.Generator().manual_seed(0)] for _ in range(N_DRAWS)]
    _assert_rate(sum(d[0].blur for d in draws), N_DRAWS, 0.5, "digits blur")
    assert all(abs(d[v].rotation_deg) <= 15 and abs(d[v].shear_deg) <= 10 for d in draws[:200] for v in range(6))
    assert all(0.7 <= d[2].gain <= 1.3 and 0 <= d[2].noise_std <= 0.05 for d in draws[:200])
    digit = Image.fromarray((np.eye(32) * 255).astype(np.uint8))
    views = transform(digit, torch.Generator().manual_seed(0))
    again = transform(digit, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    low, high = (0.0 - 0.3) / 0.4, (1.5 - 0.3) / 0.4
    assert all(v.min() >= low - 1e-6 and v.max() <= high + 1e-6 for v in views)
    # The diagonal stroke survives: views are not blank.
    assert all(v.std() > 0.1 for v in views)
