"""Bit-exact uint8 kernels (numba) of the PIL operations in the DINO multi-crop.

Each kernel reproduces, value for value, what the PIL path of :class:`~ssl_vil.augment.multicrop.MultiCropTransform`
computes (torchvision's PIL functionals on Pillow's C code), so switching kernels changes no pixel, no sampled
decision and no distribution; ``tests/test_augment_fast_ops.py`` checks every kernel against PIL (exhaustively over
all 2**24 colours for the HSV round trip). What they replace, and why they are faster:

- crop + bicubic resize (``resized_crop``: ``image.crop(box).resize((S, S), BICUBIC)``): ``Resample.c``'s two
  passes (weights in double from ``precompute_coeffs``, 22-bit fixed point, uint8 after each pass) in the
  installed Pillow's pass order (Pillow 13 runs the vertical pass first when the height shrinks by more than twice
  as many pixels as the width; :func:`warmup` finds the order on probe images, and an unknown one falls back to
  PIL). Each pass runs down the rows of an array, all columns at once (vectorised): the horizontal one on the
  transposed image (transposed once per sample), with one transpose of the intermediate. 4-5x faster than Pillow;
- hue (``adjust_hue``: RGB -> HSV, uint8 shift of H, HSV -> RGB): Pillow's ``Convert.c`` arithmetic in one pass
  without the HSV image, ``split`` and ``merge``: float32 where C has ``float``, float64 where it has ``double``,
  C truncation and ``round``, the colour branches as selects, so the pixel loop vectorises (~4x faster than the
  earlier table-driven scalar port, ~7x faster than PIL);
- brightness / contrast (``ImageEnhance``: ``Image.blend`` with black / the rounded mean luma): ``Blend.c``'s
  float32 ``in1 + alpha * (in2 - in1)``, truncated (clipped when extrapolating), as a 256-entry table;
- saturation (blend with the luma image; vectorised), grayscale (``rgb2l``: ``(19595 R + 38470 G + 7471 B +
  0x8000) >> 16``) and solarize (threshold 128), per pixel;
- Gaussian blur (``ImageFilter.GaussianBlur(radius)``): ``BoxBlur.c``'s three extended-box passes per axis in
  24-bit fixed point in UINT32 (rows first, rounded to uint8 after each pass), box radius from the same float32
  formula;
- the final ``/ 255``, ``(x - mean) / std`` (a per-channel 256-entry float32 table built with the same torch
  ops, so the floats are identical) plus the horizontal flip (every op after the flip is per pixel, uses a global
  mean, or is a symmetric filter with clamped edges, so flipping at the end gives the same pixels).

Left to Pillow: the JPEG decode (now the largest single cost of a sample).
Without numba, :data:`AVAILABLE` is False and the multi-crop keeps its PIL path (same outputs, slower). Compiled
code is cached on disk (``cache=True``, first compile ~10 s); :func:`warmup` compiles or loads it, so DataLoader
workers forked after it inherit the machine code.
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:  # pragma: no cover - exercised through AVAILABLE
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover
    numba = None
    AVAILABLE = False


def _jit(fn):
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache location (read-only install, no NUMBA_CACHE_DIR): compile per process
        return numba.njit(nogil=True)(fn)


# ----------------------------------------------------------------------------------------------- colour ops


@_jit
def _blend_table(base, alpha):
    """uint8 table v -> Blend.c ``(UINT8)(base + alpha * (v - base))`` (float32; clipped when extrapolating)."""
    table = np.empty(256, np.uint8)
    inside = alpha >= 0 and alpha <= 1.0
    for v in range(256):
        value = np.float32(base) + alpha * np.float32(v - base)
        if inside:
            table[v] = np.int64(value)  # a value inside [0, 255]: the (UINT8) cast truncates
        elif value <= 0.0:
            table[v] = 0
        elif value >= 255.0:
            table[v] = 255
        else:
            table[v] = np.int64(value)
    return table


@_jit
def _apply_table(flat, table):
    for i in range(flat.shape[0]):
        flat[i] = table[flat[i]]


@_jit
def _luma(r, g, b):  # Convert.c rgb2l: L24(rgb) >> 16
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


@_jit
def _gray_mean(img):
    height, width, _ = img.shape
    total = 0
    for y in range(height):
        for x in range(width):
            total += _luma(np.int64(img[y, x, 0]), np.int64(img[y, x, 1]), np.int64(img[y, x, 2]))
    return total


@_jit
def _saturation(flat, alpha):
    """Blend.c of the luma image (in1) and the image (in2), per pixel of the (3 n,) uint8 ``flat``, in place.

    float32 ``gray + alpha * (v - gray)``, clamped to [0, 255] and truncated: for alpha in [0, 1] the value is a
    rounded convex combination of two values in [0, 255] and so already inside (the clamp is Blend.c's
    extrapolation branch). Unconditional stores: the loop vectorises."""
    zero = np.float32(0.0)
    top = np.float32(255.0)
    for i in range(flat.shape[0] // 3):
        r = np.int32(flat[3 * i])
        g = np.int32(flat[3 * i + 1])
        b = np.int32(flat[3 * i + 2])
        gray = np.float32((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)
        red = gray + alpha * (np.float32(r) - gray)
        green = gray + alpha * (np.float32(g) - gray)
        blue = gray + alpha * (np.float32(b) - gray)
        flat[3 * i] = np.int32(min(max(red, zero), top))
        flat[3 * i + 1] = np.int32(min(max(green, zero), top))
        flat[3 * i + 2] = np.int32(min(max(blue, zero), top))


def _jit_vector(fn):
    """:func:`_jit` with numpy's error model: a float division by zero gives inf / nan instead of raising, so the
    loop has no exception branch and LLVM vectorises it (the kernels below never divide by zero)."""
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:
        return numba.njit(nogil=True, error_model="numpy")(fn)


@_jit_vector
def _round_half_up(value):
    """C ``round()`` of a value >= 0 (half away from zero): truncate, add 1 from .5 up (the difference is exact)."""
    whole = np.int32(value)
    return whole + np.int32(value - np.float64(whole) >= 0.5)


@_jit_vector
def _hue(flat, shift):
    """Convert.c ``rgb2hsv_row``, ``H += shift`` (uint8 wrap), ``hsv2rgb``, on the (3 n,) uint8 ``flat`` in place.

    Pillow's arithmetic step for step, float32 where C has ``float`` and float64 where it has ``double`` (an
    expression with a double literal), C's ``(int)`` truncation and ``round``; the branches on the colour are
    selects (the grey case divides by 1 instead of 0 and is then zeroed; ``s == 0`` needs no branch, since
    ``v * (1.0 - 0.0)`` is v), so the loop vectorises (16 pixels per step with AVX-512).
    """
    for i in range(flat.shape[0] // 3):
        r = np.int32(flat[3 * i])
        g = np.int32(flat[3 * i + 1])
        b = np.int32(flat[3 * i + 2])
        maxc = max(r, max(g, b))
        minc = min(r, min(g, b))
        gray = maxc == minc
        # rgb2hsv_row: float cr, s, rc, gc, bc; h = bc - gc | 2.0 + rc - bc | 4.0 + gc - rc (double, stored float)
        cr = np.float32(maxc - minc) if not gray else np.float32(1.0)
        s = cr / np.float32(max(maxc, 1))
        rc = np.float32(maxc - r) / cr
        gc = np.float32(maxc - g) / cr
        bc = np.float32(maxc - b) / cr
        h_r = bc - gc
        h_g = np.float32(2.0 + np.float64(rc) - np.float64(bc))
        h_b = np.float32(4.0 + np.float64(gc) - np.float64(rc))
        h = h_r if r == maxc else (h_g if g == maxc else h_b)
        # h = fmod(h / 6.0 + 1.0, 1.0): the argument lies in [5/6, 11/6], where fmod is an exact "- 1.0"
        wrapped = np.float64(h) / 6.0 + 1.0
        wrapped = wrapped - 1.0 if wrapped >= 1.0 else wrapped
        uh = min(max(np.int32(np.float64(np.float32(wrapped)) * 255.0), 0), 255)
        us = min(max(np.int32(np.float64(s) * 255.0), 0), 255)
        if gray:
            uh = 0
            us = 0
        uh = (uh + shift) & 255
        # hsv2rgb: i = floor(h * 6.0 / 255.0), float f = h * 6.0 / 255.0 - i, float fs = s / 255.0
        scaled = np.float64(uh) * 6.0 / 255.0
        sextant = np.int32(math.floor(scaled))
        f = np.float32(scaled - np.float64(sextant))
        fs = np.float32(np.float64(us) / 255.0)
        v = np.float64(maxc)
        p = min(max(_round_half_up(v * (1.0 - np.float64(fs))), 0), 255)
        q = min(max(_round_half_up(v * (1.0 - np.float64(fs * f))), 0), 255)
        t = min(max(_round_half_up(v * (1.0 - np.float64(fs) * (1.0 - np.float64(f)))), 0), 255)
        sextant = sextant - 6 * np.int32(sextant >= 6)  # i % 6 (i <= 6)
        # (v, t, p) (q, v, p) (p, v, t) (p, q, v) (t, p, v) (v, p, q) for i % 6 = 0 .. 5
        red = maxc if (sextant == 0 or sextant == 5) else (q if sextant == 1 else (t if sextant == 4 else p))
        green = t if sextant == 0 else (maxc if (sextant == 1 or sextant == 2) else (q if sextant == 3 else p))
        blue = p if (sextant == 0 or sextant == 1) else (t if sextant == 2 else (maxc if sextant < 5 else q))
        # unconditional stores of selected values (a select per store kept LLVM from vectorising)
        flat[3 * i] = red
        flat[3 * i + 1] = green
        flat[3 * i + 2] = blue


@_jit
def _grayscale(img):
    height, width, _ = img.shape
    for y in range(height):
        for x in range(width):
            gray = _luma(np.int64(img[y, x, 0]), np.int64(img[y, x, 1]), np.int64(img[y, x, 2]))
            img[y, x, 0] = gray
            img[y, x, 1] = gray
            img[y, x, 2] = gray


@_jit
def _solarize(img, threshold):
    height, width, _ = img.shape
    for y in range(height):
        for x in range(width):
            for c in range(3):
                if img[y, x, c] >= threshold:
                    img[y, x, c] = 255 - img[y, x, c]


# ----------------------------------------------------------------------------------------------------- blur


@_jit
def _box_radius(radius, passes):
    """BoxBlur.c _gaussian_blur_radius: float32 box radius whose ``passes`` boxes approximate the Gaussian."""
    sigma2 = np.float32(radius * radius) / np.float32(passes)
    big_l = np.float32(math.sqrt(12.0 * np.float64(sigma2) + 1.0))
    small_l = np.float32(math.floor((np.float64(big_l) - 1.0) / 2.0))
    a = (np.float32(2) * small_l + np.float32(1)) * (small_l * (small_l + np.float32(1)) - np.float32(3) * sigma2)
    a = a / (np.float32(6) * (sigma2 - (small_l + np.float32(1)) * (small_l + np.float32(1))))
    return small_l + a


@_jit
def _box_pass(src, dst, radius, ww, fw):
    """One extended-box pass down the rows of (n, m) ``src`` (clamped edges), 24-bit fixed point, into ``dst``.

    dst[y] = (ww * sum(src[y - radius .. y + radius]) + fw * (src[y - radius - 1] + src[y + radius + 1])
    + 2**23) >> 24, indices clamped to the image: BoxBlur.c's line filter, run for all m columns at once, in
    BoxBlur.c's UINT32 arithmetic (no sum exceeds 255 * 2**24 + 2**23 < 2**32; 32-bit lanes vectorise twice as
    wide as the int64 of an earlier version, with the same values).
    """
    n, m = src.shape
    last = n - 1
    acc = np.zeros(m, np.uint32)
    ww32 = np.uint32(ww)
    fw32 = np.uint32(fw)
    half = np.uint32(1 << 23)
    shift = np.uint32(24)
    for k in range(-radius, radius + 1):
        row = src[min(max(k, 0), last)]
        for j in range(m):
            acc[j] += np.uint32(row[j])
    for y in range(n):
        lo = src[max(y - radius - 1, 0)]
        hi = src[min(y + radius + 1, last)]
        out = src[max(y - radius, 0)]
        line = dst[y]
        for j in range(m):
            far = np.uint32(np.uint32(lo[j]) + np.uint32(hi[j]))
            line[j] = np.uint32(np.uint32(acc[j] * ww32) + np.uint32(far * fw32) + half) >> shift
            acc[j] = np.uint32(acc[j] + np.uint32(hi[j]) - np.uint32(out[j]))


@_jit
def _box_passes(lines, radius, ww, fw, passes):
    """``passes`` box passes down the rows of (n, m) uint8 ``lines``, in place."""
    tmp = np.empty_like(lines)
    for i in range(passes):
        if i % 2 == 0:
            _box_pass(lines, tmp, radius, ww, fw)
        else:
            _box_pass(tmp, lines, radius, ww, fw)
    if passes % 2 == 1:
        lines[:, :] = tmp


@_jit
def _swap_axes(img, out):
    """out[x, y] = img[y, x] for (h, w, 3) ``img`` and (w, h, 3) ``out``."""
    height, width, _ = img.shape
    for y in range(height):
        for x in range(width):
            out[x, y, 0] = img[y, x, 0]
            out[x, y, 1] = img[y, x, 1]
            out[x, y, 2] = img[y, x, 2]


@_jit
def _box_weights(radius, passes):
    box = _box_radius(np.float32(radius), passes)
    whole = np.int64(box)
    ww = np.int64(np.float32(1 << 24) / (box * np.float32(2) + np.float32(1)))
    fw = ((1 << 24) - (whole * 2 + 1) * ww) // 2
    return whole, ww, fw


# -------------------------------------------------------------------------------------------- crop + resize

# Resample.c: 8-bit results from 32-bit fixed point with two bits of headroom.
_PRECISION_BITS = 32 - 8 - 2


@_jit
def _bicubic_filter(x):
    """Resample.c bicubic_filter (a = -0.5), in double."""
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@_jit
def _bicubic_coeffs(in_size, out_size):
    """Resample.c ``precompute_coeffs`` (box 0 .. in_size, bicubic) + ``normalize_coeffs_8bpc``: per output
    pixel the first input index and the tap count (``bounds`` (out, 2)) and the int32 weights (``kk`` (out, ksize)).
    """
    scale = np.float64(in_size) / out_size  # (double)(in1 - in0) / outSize, in1 - in0 an exact float
    filterscale = scale
    if filterscale < 1.0:
        filterscale = 1.0
    support = 2.0 * filterscale
    ksize = np.int64(math.ceil(support)) * 2 + 1
    bounds = np.empty((out_size, 2), np.int64)
    kk = np.zeros((out_size, ksize), np.int32)
    weights = np.zeros(ksize, np.float64)
    inv_filterscale = 1.0 / filterscale
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        ww = 0.0
        xmin = np.int64(center - support + 0.5)  # (int) truncates: the argument is > -1 here
        if xmin < 0:
            xmin = 0
        xmax = np.int64(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        for x in range(xmax):
            w = _bicubic_filter((np.float64(x + xmin) - center + 0.5) * inv_filterscale)
            weights[x] = w
            ww += w
        for x in range(xmax):
            w = weights[x]
            if ww != 0.0:
                w = w / ww
            if w < 0:
                kk[xx, x] = np.int32(-0.5 + w * (1 << _PRECISION_BITS))
            else:
                kk[xx, x] = np.int32(0.5 + w * (1 << _PRECISION_BITS))
        bounds[xx, 0] = xmin
        bounds[xx, 1] = xmax
    return bounds, kk


@_jit
def _resample_lines(src, first_row, col0, ncols, bounds, kk, dst):
    """One Resample.c pass along the rows of 2-D uint8 ``src``, for all ``ncols`` columns from ``col0`` at once:
    ``dst[o, j] = clip8(2**21 + sum_t kk[o, t] * src[first_row + bounds[o, 0] + t, col0 + j])`` (int32, as
    ``ImagingResampleVertical_8bpc``; the horizontal pass is the same on a transposed image)."""
    acc = np.empty(ncols, np.int32)
    half = np.int32(1 << (_PRECISION_BITS - 1))
    for o in range(dst.shape[0]):
        for j in range(ncols):
            acc[j] = half
        lo = first_row + bounds[o, 0]
        for t in range(bounds[o, 1]):
            k = kk[o, t]
            row = src[lo + t, col0 : col0 + ncols]  # a slice, so the loop indexes from 0 and vectorises
            for j in range(ncols):
                acc[j] += np.int32(row[j]) * k
        out = dst[o]
        for j in range(ncols):
            out[j] = min(max(acc[j] >> _PRECISION_BITS, 0), 255)


class ResizeSource:
    """The decoded image of one sample for :func:`resized_crop`: (H, W, 3) uint8 pixels and, made on first use,
    their transpose (the horizontal pass then runs down contiguous rows, vectorised, instead of across pixels)."""

    __slots__ = ("pixels", "_transposed")

    def __init__(self, pixels: np.ndarray) -> None:
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected (H, W, 3) uint8 pixels, got {pixels.dtype} {pixels.shape}")
        self.pixels = np.ascontiguousarray(pixels)
        self._transposed: np.ndarray | None = None

    @property
    def transposed(self) -> np.ndarray:
        if self._transposed is None:
            height, width, _ = self.pixels.shape
            self._transposed = np.empty((width, height, 3), np.uint8)
            _swap_axes(self.pixels, self._transposed)
        return self._transposed


def _horizontal_first_pillow13(in_width: int, in_height: int, width: int, height: int) -> bool:
    """Pillow >= 13's pass order (ImagingResampleInner): vertical first when the height shrinks by more than
    twice as many pixels as the width."""
    return not (in_height - height > 0 and in_height - height > (in_width - width) * 2)


def _horizontal_first_always(in_width: int, in_height: int, width: int, height: int) -> bool:
    return True


# The pass order of the installed Pillow (found by :func:`_probe_pass_order`; None: unknown, use PIL).
_PASS_ORDER = None


def _probe_pass_order():
    """Which of the known pass orders the installed Pillow's ``resize`` follows, from images on which the orders
    give different pixels (each pass rounds to uint8, so the order shows); None if neither matches."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rules = [_horizontal_first_pillow13, _horizontal_first_always]
    for height, width, size in ((40, 12, 5), (37, 17, 9), (30, 21, 8), (21, 30, 8), (17, 37, 9), (40, 40, 11)):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))
        source = ResizeSource(pixels)
        rules = [rule for rule in rules
                 if np.array_equal(_resized_crop(source, 0, 0, height, width, size, rule), expected)]
    return rules[0] if rules else None


def resized_crop(source: ResizeSource, top: int, left: int, height: int, width: int, size: int) -> np.ndarray | None:
    """``image.crop((left, top, left + width, top + height)).resize((size, size), BICUBIC)`` as (size, size, 3)
    uint8, bit for bit (Pillow's ``Resample.c``: bicubic weights in double, 22-bit fixed point, two passes in the
    installed Pillow's order, uint8 after each). None when the box leaves the image or the installed Pillow's pass
    order is not one this port knows: the caller then uses PIL."""
    global _PASS_ORDER
    if _PASS_ORDER is None:
        _PASS_ORDER = _probe_pass_order() or False
    image_height, image_width, _ = source.pixels.shape
    if not _PASS_ORDER or top < 0 or left < 0 or height < 1 or width < 1 or top + height > image_height \
            or left + width > image_width:
        return None
    return _resized_crop(source, top, left, height, width, size, _PASS_ORDER)


def _resized_crop(source, top, left, height, width, size, horizontal_first_rule):
    need_horizontal, need_vertical = width != size, height != size
    if not (need_horizontal or need_vertical):
        return source.pixels[top : top + height, left : left + width].copy()
    if horizontal_first_rule(width, height, size, size):
        v_bounds, v_kk = _bicubic_coeffs(height, size)
        if need_horizontal:
            h_bounds, h_kk = _bicubic_coeffs(width, size)
            first = int(v_bounds[0, 0])  # ImagingResampleInner: only the rows the vertical pass reads
            rows = int(v_bounds[-1, 0] + v_bounds[-1, 1]) - first
            transposed = source.transposed
            passed = np.empty((size, rows, 3), np.uint8)  # the horizontal pass, transposed: (x, y, 3)
            _resample_lines(transposed.reshape(transposed.shape[0], -1), left, (top + first) * 3, rows * 3,
                            h_bounds, h_kk, passed.reshape(size, rows * 3))
            lines = np.empty((rows, size, 3), np.uint8)
            _swap_axes(passed, lines)
            if not need_vertical:
                return lines
            v_bounds = v_bounds.copy()
            v_bounds[:, 0] -= first
            src, first_row, col0 = lines.reshape(rows, size * 3), 0, 0
        else:
            src, first_row, col0 = source.pixels.reshape(source.pixels.shape[0], -1), top, left * 3
        out = np.empty((size, size, 3), np.uint8)
        _resample_lines(src, first_row, col0, size * 3, v_bounds, v_kk, out.reshape(size, size * 3))
        return out
    # vertical pass first (then necessarily needed: the height shrinks)
    v_bounds, v_kk = _bicubic_coeffs(height, size)
    pixels = source.pixels
    passed = np.empty((size, width, 3), np.uint8)
    _resample_lines(pixels.reshape(pixels.shape[0], -1), top, left * 3, width * 3, v_bounds, v_kk,
                    passed.reshape(size, width * 3))
    if not need_horizontal:
        return passed
    h_bounds, h_kk = _bicubic_coeffs(width, size)
    lines = np.empty((width, size, 3), np.uint8)
    _swap_axes(passed, lines)
    result = np.empty((size, size, 3), np.uint8)  # (x, y, 3)
    _resample_lines(lines.reshape(width, size * 3), 0, 0, size * 3, h_bounds, h_kk, result.reshape(size, size * 3))
    out = np.empty((size, size, 3), np.uint8)
    _swap_axes(result, out)
    return out


# ------------------------------------------------------------------------------------------------ to tensor


@_jit
def _to_chw(img, table, flip):
    height, width, _ = img.shape
    out = np.empty((3, height, width), np.float32)
    for c in range(3):
        for y in range(height):
            for x in range(width):
                src = width - 1 - x if flip else x
                out[c, y, x] = table[c, img[y, src, c]]
    return out


# ------------------------------------------------------------------------------------------- python wrappers


def _on_pixels(img: np.ndarray, kernel, *args) -> None:
    """Run ``kernel(flat, *args)`` on the (3 n,) values of (H, W, 3) ``img``, in place (a C-contiguous image, as the
    multi-crop's, is its own flat view; any other is copied and written back)."""
    flat = img.reshape(-1)
    kernel(flat, *args)
    if not np.shares_memory(flat, img):
        img[...] = flat.reshape(img.shape)


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """In place: ``ImageEnhance.Brightness(img).enhance(factor)`` (blend with black: a table on the values)."""
    if factor != 1.0:
        _apply_table(img.reshape(-1), _blend_table(0, np.float32(factor)))
    return img


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """In place: ``ImageEnhance.Contrast(img).enhance(factor)`` (blend with the rounded mean luma)."""
    height, width, _ = img.shape
    mean = int(_gray_mean(img) / (height * width) + 0.5)  # ImageStat mean of the "L" image, int(mean + 0.5)
    if factor != 1.0:
        _apply_table(img.reshape(-1), _blend_table(mean, np.float32(factor)))
    return img


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """In place: ``ImageEnhance.Color(img).enhance(factor)`` (blend with the luma image)."""
    if factor != 1.0:
        _on_pixels(img, _saturation, np.float32(factor))
    return img


def adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
    """In place: torchvision's PIL ``adjust_hue`` (H += uint8(int32(factor * 255)) in Pillow's HSV)."""
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f"hue factor {factor} is not in [-0.5, 0.5]")
    _on_pixels(img, _hue, int(np.int32(factor * 255)) & 255)
    return img


def to_grayscale(img: np.ndarray) -> np.ndarray:
    """In place: ``rgb_to_grayscale(img, num_output_channels=3)`` (PIL "L", repeated)."""
    _grayscale(img)
    return img


def gaussian_blur(img: np.ndarray, radius: float, passes: int = 3) -> np.ndarray:
    """In place: ``img.filter(ImageFilter.GaussianBlur(radius))``: ``passes`` box passes along the rows of the
    image, then ``passes`` down its columns, rounded to uint8 after every pass."""
    if radius <= 0:
        return img
    height, width, channels = img.shape
    whole, ww, fw = _box_weights(float(radius), passes)
    transposed = np.empty((width, height, channels), np.uint8)
    _swap_axes(img, transposed)  # the passes along rows run down the columns of the transpose (vectorised)
    _box_passes(transposed.reshape(width, height * channels), whole, ww, fw, passes)
    _swap_axes(transposed, img)
    _box_passes(img.reshape(height, width * channels), whole, ww, fw, passes)
    return img


def solarize(img: np.ndarray, threshold: int = 128) -> np.ndarray:
    """In place: ``ImageOps.solarize(img, threshold)`` (values >= threshold are inverted)."""
    _solarize(img, threshold)
    return img


def normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: ``((v / 255) - mean) / std`` with the float32 torch ops of ``pil_to_tensor`` +
    ``div_(255)`` + ``TF.normalize``, so looking up a uint8 value gives the same float."""
    values = torch.arange(256, dtype=torch.float32).div_(255.0).expand(3, 256).clone()
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1)
    return values.sub_(mean_t).div_(std_t).numpy().copy()


def to_normalized_tensor(img: np.ndarray, table: np.ndarray, flip: bool = False) -> torch.Tensor:
    """(H, W, 3) uint8 -> normalised (3, H, W) float32 tensor via ``table``; ``flip`` mirrors the columns."""
    return torch.from_numpy(_to_chw(img, table, bool(flip)))


_WARM = False


def warmup() -> None:
    """Compile (or load from the disk cache) every kernel once, in this process, and find Pillow's pass order."""
    global _WARM
    if _WARM or not AVAILABLE:
        return
    from PIL import Image

    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 3
    for factor in (0.5, 1.5):
        adjust_brightness(img, factor)
        adjust_contrast(img, factor)
        adjust_saturation(img, factor)
    adjust_hue(img, 0.1)
    to_grayscale(img)
    gaussian_blur(img, 1.0)
    solarize(img)
    to_normalized_tensor(img, normalize_table((0.5,) * 3, (0.5,) * 3), True)
    source = ResizeSource(np.arange(9 * 7 * 3, dtype=np.uint8).reshape(9, 7, 3))
    for height, width, size in ((9, 7, 4), (9, 2, 4), (3, 7, 5)):  # both pass orders; finds Pillow's order
        resized_crop(source, 0, 0, height, width, size)
    decoded = ResizeSource(np.asarray(Image.new("RGB", (7, 9))))  # read-only pixels, as from a decoded image
    for height, width, size in ((9, 7, 4), (9, 2, 4), (3, 7, 5)):
        resized_crop(decoded, 0, 0, height, width, size)
    _WARM = True
