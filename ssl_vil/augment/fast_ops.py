"""Bit-exact uint8 kernels (numba) of the PIL operations in the DINO multi-crop.

Each kernel reproduces, value for value, what the PIL path of :class:`~ssl_vil.augment.multicrop.MultiCropTransform`
computes (torchvision's PIL functionals on Pillow's C code), so switching kernels changes no pixel, no sampled
decision and no distribution; ``tests/test_augment_fast_ops.py`` checks every kernel against PIL (exhaustively over
all 2**24 colours for the HSV round trip). What they replace, and why they are faster:

- hue (``adjust_hue``: RGB -> HSV, uint8 shift of H, HSV -> RGB): Pillow's ``Convert.c`` in one pass without
  the HSV image, ``split`` and ``merge``: H and S from tables of Pillow's own float32 / float64 results (they depend
  on a pixel only through its max / min channels and differences), the way back with the same float / double
  steps and C ``round`` (half away from zero), selects instead of colour-dependent branches;
- brightness / contrast (``ImageEnhance``: ``Image.blend`` with black / the rounded mean luma): ``Blend.c``'s
  float32 ``in1 + alpha * (in2 - in1)``, truncated (clipped when extrapolating), as a 256-entry table;
- saturation (blend with the luma image), grayscale (``rgb2l``: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``)
  and solarize (threshold 128), per pixel;
- Gaussian blur (``ImageFilter.GaussianBlur(radius)``): ``BoxBlur.c``'s three extended-box passes per axis in
  24-bit fixed point (rows first, rounded to uint8 after each pass), box radius from the same float32 formula;
- the final ``/ 255``, ``(x - mean) / std`` (a per-channel 256-entry float32 table built with the same torch
  ops, so the floats are identical) plus the horizontal flip (every op after the flip is per pixel, uses a global
  mean, or is a symmetric filter with clamped edges, so flipping at the end gives the same pixels).

Not ported: the crop + bicubic resize (a first numba port of ``Resample.c`` was slower than Pillow and not yet
bit-exact), which stays PIL and is now the largest cost of a view.
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
    """Blend.c of the luma image (in1) and the image (in2), per pixel of (n, 3) ``flat``."""
    n = flat.shape[0]
    if alpha >= 0 and alpha <= 1.0:
        for i in range(n):
            gray = np.float32(_luma(np.int64(flat[i, 0]), np.int64(flat[i, 1]), np.int64(flat[i, 2])))
            for c in range(3):
                flat[i, c] = np.int64(gray + alpha * (np.float32(flat[i, c]) - gray))
    else:
        for i in range(n):
            gray = np.float32(_luma(np.int64(flat[i, 0]), np.int64(flat[i, 1]), np.int64(flat[i, 2])))
            for c in range(3):
                value = gray + alpha * (np.float32(flat[i, c]) - gray)
                flat[i, c] = np.int64(min(max(value, np.float32(0.0)), np.float32(255.0)))


@_jit
def _hue(img, shift, hue_table, sat_table, fs_table, f_table):
    """Convert.c ``rgb2hsv_row``, ``H += shift`` (uint8 wrap), ``hsv2rgb``, pixel by pixel, without branches on
    the colour (selects by masks: mispredicted branches made it ~2x slower).

    Pillow's H depends on a pixel only through (which channel is the max / the min, max - min, max - mid), and S
    through (max - min, max): ``hue_table`` / ``sat_table`` (:func:`_hsv_tables`) hold Pillow's values for every
    such combination. Back to RGB, V is the max channel and p / q / t follow hsv2rgb's float / double steps with
    ``fs_table[s] = (float)(s / 255.0)`` and ``f_table[h] = (float)(h * 6.0 / 255.0 - i)``.
    """
    flat = img.reshape(-1, 3)
    for i in range(flat.shape[0]):
        r = np.int64(flat[i, 0])
        g = np.int64(flat[i, 1])
        b = np.int64(flat[i, 2])
        maxc = max(r, max(g, b))
        minc = min(r, min(g, b))
        if maxc == minc:  # h = s = 0: hsv2rgb gives (v, v, v), the pixel itself
            continue
        mid = r + g + b - maxc - minc
        # cases 0/1: r max with b / g the min; 2/3: g max with b / r the min; 4/5: b max with r / g the min
        # (ties as Convert.c: r before g before b)
        r_max = np.int64(r == maxc)
        g_max = np.int64(g == maxc) * (1 - r_max)
        b_max = 1 - r_max - g_max
        case = 2 * g_max + 4 * b_max + r_max * np.int64(g < b) + g_max * np.int64(r < b) + b_max * np.int64(g < r)
        uh = np.int64(hue_table[case, maxc - minc, maxc - mid])
        us = np.int64(sat_table[maxc - minc, maxc])
        uh = (uh + shift) & 255
        if us == 0:  # hsv2rgb: s == 0 -> (v, v, v)
            flat[i, 0] = maxc
            flat[i, 1] = maxc
            flat[i, 2] = maxc
            continue
        fs = fs_table[us]
        f = f_table[uh]
        sextant = SEXTANT[uh]
        v = np.float64(maxc)
        p_value = v * (1.0 - np.float64(fs))
        q_value = v * (1.0 - np.float64(fs * f))
        t_value = v * (1.0 - np.float64(fs) * (1.0 - np.float64(f)))
        odd = np.float64(sextant % 2)
        m_value = q_value * odd + t_value * (1.0 - odd)  # q in odd sextants, t in even ones (exact)
        # C round() (half away from zero) of values >= 0: truncate, add 1 from .5 up (the difference is exact)
        p_whole = np.int64(p_value)
        p = p_whole + np.int64(p_value - np.float64(p_whole) >= 0.5)
        m_whole = np.int64(m_value)
        m = m_whole + np.int64(m_value - np.float64(m_whole) >= 0.5)
        m = min(max(m, 0), 255)
        p = min(max(p, 0), 255)
        w0 = SOURCE[sextant, 0]
        w1 = SOURCE[sextant, 1]
        w2 = SOURCE[sextant, 2]
        flat[i, 0] = (maxc & -np.int64(w0 == 0)) | (m & -np.int64(w0 == 1)) | (p & -np.int64(w0 == 2))
        flat[i, 1] = (maxc & -np.int64(w1 == 0)) | (m & -np.int64(w1 == 1)) | (p & -np.int64(w1 == 2))
        flat[i, 2] = (maxc & -np.int64(w2 == 0)) | (m & -np.int64(w2 == 1)) | (p & -np.int64(w2 == 2))


# hsv2rgb per h = 0..255: sextant i = floor(h * 6.0 / 255.0) % 6; per sextant, which of (v, middle, p) each of
# R, G, B takes (Convert.c: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q); middle = q in odd sextants, else t)
SEXTANT = ((np.arange(256) * 6) // 255 % 6).astype(np.int64)
SOURCE = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1], [2, 1, 0], [1, 2, 0], [0, 2, 1]], np.int64)
_LEVELS = np.arange(256, dtype=np.float64)
FS_TABLE = (_LEVELS / 255.0).astype(np.float32)
_HD = _LEVELS.astype(np.float32).astype(np.float64) * 6.0 / 255.0
F_TABLE = (_HD - np.floor(_HD)).astype(np.float32)


def _rgb_to_hs_reference(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Convert.c rgb2hsv_row (H and S), vectorised: float32 where C has float, float64 where it has double."""
    r, g, b = (c.astype(np.int64) for c in (r, g, b))
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    gray = maxc == minc
    cr = np.where(gray, 1, maxc - minc).astype(np.float32)
    s = cr / np.where(maxc == 0, 1, maxc).astype(np.float32)
    rc, gc, bc = ((maxc - c).astype(np.float32) / cr for c in (r, g, b))
    h = np.where(r == maxc, bc - gc,
                 np.where(g == maxc, (2.0 + rc.astype(np.float64) - bc).astype(np.float32),
                          (4.0 + gc.astype(np.float64) - rc).astype(np.float32)))
    h = np.fmod(h.astype(np.float64) / 6.0 + 1.0, 1.0).astype(np.float32)
    uh = np.clip(np.trunc(h.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    us = np.clip(np.trunc(s.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    uh[gray] = 0
    us[gray] = 0
    return uh, us


_HSV_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def _hsv_tables() -> tuple[np.ndarray, np.ndarray]:
    """(hue (6, 256, 256) uint8 [case, max - min, max - mid], sat (256, 256) uint8 [max - min, max]).

    Pillow's float steps use only differences to the max channel, so each entry is evaluated on one
    representative pixel with min = 0 (entries that no pixel of that case reaches hold harmless values)."""
    global _HSV_TABLES
    if _HSV_TABLES is None:
        spread, to_max = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
        top, low, mid = spread, np.zeros_like(spread), np.clip(spread - to_max, 0, 255)
        cases = [(top, mid, low), (top, low, mid), (mid, top, low), (low, top, mid), (low, mid, top), (mid, low, top)]
        hue = np.stack([_rgb_to_hs_reference(r, g, b)[0] for r, g, b in cases])
        maxc, spread = np.meshgrid(np.arange(256), np.arange(256), indexing="xy")
        low = np.clip(maxc - spread, 0, 255)
        sat = np.ascontiguousarray(_rgb_to_hs_reference(maxc, low, low)[1])
        _HSV_TABLES = (np.ascontiguousarray(hue), sat)
    return _HSV_TABLES


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
    + 2**23) >> 24, indices clamped to the image: BoxBlur.c's line filter, run for all m columns at once.
    """
    n, m = src.shape
    last = n - 1
    acc = np.zeros(m, np.int64)
    for k in range(-radius, radius + 1):
        row = min(max(k, 0), last)
        for j in range(m):
            acc[j] += src[row, j]
    for y in range(n):
        lo = max(y - radius - 1, 0)
        hi = min(y + radius + 1, last)
        out = max(y - radius, 0)
        for j in range(m):
            far = np.int64(src[lo, j]) + np.int64(src[hi, j])
            dst[y, j] = (acc[j] * ww + far * fw + (1 << 23)) >> 24
            acc[j] += np.int64(src[hi, j]) - np.int64(src[out, j])


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
        _saturation(img.reshape(-1, 3), np.float32(factor))
    return img


def adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
    """In place: torchvision's PIL ``adjust_hue`` (H += uint8(int32(factor * 255)) in Pillow's HSV)."""
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f"hue factor {factor} is not in [-0.5, 0.5]")
    _hue(img, int(np.int32(factor * 255)) & 255, *_hsv_tables(), FS_TABLE, F_TABLE)
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
    """Compile (or load from the disk cache) every kernel once, in this process."""
    global _WARM
    if _WARM or not AVAILABLE:
        return
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
    _WARM = True
