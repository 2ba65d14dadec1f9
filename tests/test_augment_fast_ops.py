"""The numba kernels of the multi-crop (ssl_vil.augment.fast_ops) give the PIL path's pixels exactly.

Tolerance everywhere: 0 (bit-equal uint8 pixels / float32 tensors). Reference: torchvision's PIL functionals
(what ``kernels="pil"`` and lightly's DINOTransform run) on Pillow, on all 2**24 RGB colours where the op is per
pixel, and on real photos (scikit-learn's sample images) for the spatial ops and the whole transform.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter

pytest.importorskip("numba")

from ssl_vil.augment import build_multicrop, fast_ops  # noqa: E402


@pytest.fixture(scope="module")
def all_colours() -> np.ndarray:
    """(4096, 4096, 3) uint8: every RGB triple once."""
    values = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255], axis=-1).astype(np.uint8)
    return rgb.reshape(4096, 4096, 3)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    return [np.ascontiguousarray(image) for image in sklearn_datasets.load_sample_images().images]


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array)


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.0371, 0.0, 0.02, 0.1, 0.5])
def test_hue_matches_torchvision_adjust_hue_on_every_colour(all_colours, factor):
    out = fast_ops.adjust_hue(all_colours.copy(), factor)
    expected = np.asarray(TF.adjust_hue(_pil(all_colours), factor))
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("factor", [0.0, 0.6, 0.8137, 1.0, 1.2345, 1.4])
@pytest.mark.parametrize(
    ("fast", "reference"),
    [
        (fast_ops.adjust_brightness, TF.adjust_brightness),
        (fast_ops.adjust_contrast, TF.adjust_contrast),
        (fast_ops.adjust_saturation, TF.adjust_saturation),
    ],
    ids=["brightness", "contrast", "saturation"],
)
def test_blends_match_image_enhance(all_colours, fast, reference, factor):
    part = np.ascontiguousarray(all_colours[::4])  # every colour with a red value divisible by 4: 4M pixels
    assert np.array_equal(fast(part.copy(), factor), np.asarray(reference(_pil(part), factor)))


def test_contrast_uses_the_mean_of_the_image(photos):
    for photo in photos:
        for factor in (0.6, 1.4):
            out = fast_ops.adjust_contrast(photo.copy(), factor)
            assert np.array_equal(out, np.asarray(TF.adjust_contrast(_pil(photo), factor)))


def test_grayscale_and_solarize(all_colours):
    part = np.ascontiguousarray(all_colours[::4])
    gray = np.asarray(TF.rgb_to_grayscale(_pil(part), num_output_channels=3))
    assert np.array_equal(fast_ops.to_grayscale(part.copy()), gray)
    assert np.array_equal(fast_ops.solarize(part.copy(), 128), np.asarray(TF.solarize(_pil(part), threshold=128)))


@pytest.mark.parametrize("radius", [0.1, 0.37, 1.0, 2.0, 3.3, 7.5])
def test_blur_matches_pil_gaussian_blur(photos, radius):
    for photo in photos:
        for height, width in [(224, 224), (96, 96), (17, 5), (3, 40), (1, 1)]:
            crop = np.ascontiguousarray(photo[100 : 100 + height, 200 : 200 + width])
            expected = np.asarray(_pil(crop).filter(ImageFilter.GaussianBlur(radius=radius)))
            assert np.array_equal(fast_ops.gaussian_blur(crop.copy(), radius), expected), (radius, height, width)


def test_normalised_tensor_and_flip_match_pil_to_tensor_and_normalize(photos):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    table = fast_ops.normalize_table(mean, std)
    crop = np.ascontiguousarray(photos[0][:50, :70])
    expected = TF.normalize(TF.pil_to_tensor(_pil(crop)).to(torch.float32).div_(255.0), list(mean), list(std))
    assert torch.equal(fast_ops.to_normalized_tensor(crop, table), expected)
    assert torch.equal(fast_ops.to_normalized_tensor(crop, table, flip=True), expected.flip(-1))


@pytest.mark.parametrize("preset", ["dino", "dinov2"])
def test_numba_views_equal_pil_views_for_the_same_generator(photos, preset):
    """Whole transform, every random decision exercised (jitter order, gray, blur, solarize, flip): equal views."""
    kwargs = dict(global_size=112, local_size=48, n_local=4)
    fast = build_multicrop(preset, kernels="numba", **kwargs)
    slow = build_multicrop(preset, kernels="pil", **kwargs)
    assert (fast.kernels, slow.kernels) == ("numba", "pil")
    gray = np.repeat(photos[1][..., :1], 3, axis=-1)  # colourless pixels: hue's h = s = 0 branch
    images = [_pil(photo[::2, ::2]) for photo in photos] + [_pil(gray[:120, :90]), _pil(photos[0][:30, :41])]
    for seed in range(12):
        for image in images:
            a = fast(image, torch.Generator().manual_seed(seed))
            b = slow(image, torch.Generator().manual_seed(seed))
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (seed, image.size)


def test_kernels_option_is_checked():
    assert build_multicrop("dino", kernels="auto").kernels == "numba"
    with pytest.raises(ValueError, match="kernels must be"):
        build_multicrop("dino", kernels="cuda")
