"""Image and label decoding of one record, with a decompression-bomb guard and correct RGB conversion.

CMYK, grayscale (``L``, ``1``), palette (``P``), alpha (``LA``, ``RGBA``, transparent ``P``) and 16/32-bit
grayscale (``I;16*``, ``I``, ``F``) images all come out as 8-bit RGB. 16-bit data is rescaled (>> 8) instead of
clipped, which is what PIL's own ``convert("RGB")`` would do to values above 255.

The pixel limit is ours (``max_pixels``); PIL itself still refuses images above twice its own
``Image.MAX_IMAGE_PIXELS`` (179 M pixels by default) while opening them, which is reported the same way.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from ssl_vil.data.errors import DataIssue
from ssl_vil.data.tar_records import image_member

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold
# Largest class index a ``.cls`` member may hold: int32, which every consumer (torch, faiss, numpy) indexes with.
MAX_LABEL = 2**31 - 1


class SampleIssue(Exception):
    """A record that cannot become a sample; carries the typed :class:`DataIssue`."""

    def __init__(self, issue: DataIssue) -> None:
        super().__init__(issue.describe())
        self.issue = issue


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of ``image`` (see the module docstring for the modes handled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        # 16-bit data (any value above 255) is rescaled to 8 bits; 8-bit data stored in a wider mode is kept.
        if values.max(initial=0) > 255:
            values = np.clip(values, 0, 65535) >> 8
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.rint(np.clip(np.asarray(image), 0.0, 255.0)).astype(np.uint8)
        return Image.fromarray(values, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Composite on black like a premultiplied view of the pixels, so transparent regions carry no hidden colour.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, *, url: str, record: int, key: str, max_pixels: int) -> Image.Image:
    """Decode image bytes to RGB; raise :class:`SampleIssue` (undecodable / oversized) naming the sample."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; PIL's warning for images between 1x and 2x its limit would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise SampleIssue(
                    DataIssue(
                        "oversized_image",
                        url,
                        record,
                        key,
                        f"{width}x{height} = {width * height} pixels exceeds max_image_pixels={max_pixels}",
                    )
                )
            image.load()
            return to_rgb(image)
    except SampleIssue:
        raise
    except Image.DecompressionBombError as exc:
        raise SampleIssue(DataIssue("oversized_image", url, record, key, str(exc))) from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for corrupt bytes
        raise SampleIssue(
            DataIssue("undecodable_image", url, record, key, f"{type(exc).__name__}: {exc}")
        ) from exc


def decode_label(members: dict[str, bytes], *, url: str, record: int, key: str) -> int:
    """The integer in the ``.cls`` member, or -1 when the record has none.

    A label is a class index in ``[0, MAX_LABEL]``: -1 is reserved for "no label", and anything else negative or
    beyond int32 would pass decoding and fail later (an int64 overflow in the collate, a negative index in k-NN).
    """
    raw = members.get("cls")
    if raw is None:
        return -1
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise SampleIssue(DataIssue("bad_label", url, record, key, f".cls is not an integer: {raw[:32]!r}")) from exc
    if not 0 <= label <= MAX_LABEL:
        raise SampleIssue(DataIssue("bad_label", url, record, key,
                                    f".cls {raw[:32]!r} is outside the class-index range [0, {MAX_LABEL}]"))
    return label


def decode_record(
    members: dict[str, bytes], *, url: str, record: int, key: str, max_pixels: int
) -> tuple[Image.Image, int]:
    """(RGB image, label) of a record that has an image member."""
    ext = image_member(members)
    if ext is None:
        raise SampleIssue(DataIssue("missing_image", url, record, key, f"no image member among {sorted(members)}"))
    label = decode_label(members, url=url, record=record, key=key)
    return decode_image(members[ext], url=url, record=record, key=key, max_pixels=max_pixels), label
