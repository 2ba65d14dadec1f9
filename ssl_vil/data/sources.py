"""Image sources the shard writer reads: an ImageFolder tree, a text file list, the built-in digits set, or a
segmentation set (a folder of images with a parallel folder of masks, or the built-in ``builtin:digits-seg``).

A source is a list of :class:`SourceItem` (key, label, image extension, where the bytes come from, byte size,
and for segmentation the mask's location and size) plus the class names the labels index (for segmentation: the
names of the mask values). Keys are sanitised for webdataset (only ``[A-Za-z0-9_-]``, so never a dot, at most 120
characters) and made unique by suffixing ``_1``, ``_2``... in source order.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ssl_vil.data.digits_seg import DIGITS_SEG_CLASSES, DIGITS_SEG_SPEC, digits_seg_keys, digits_seg_png_bytes
from ssl_vil.data.errors import DataConfigError

SOURCE_IMAGE_SUFFIXES = {
    ".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp",
    ".tif": "tif", ".tiff": "tiff", ".gif": "gif", ".ppm": "ppm", ".pgm": "pgm",
}
DIGITS_SPEC = "builtin:digits"
DIGITS_TRAIN = 1297  # of 1797; the rest (500) is the val split
MASK_SUFFIX = ".png"  # a mask file is <stem>.png in a tree parallel to its image's <stem>.<ext>
MASK_MEMBER = "mask.png"  # tar member extension of a mask: <key>.mask.png next to the image <key>.<ext>
_MAX_KEY = 120


@dataclass(frozen=True, slots=True)
class SourceItem:
    key: str
    label: int  # -1 when unlabeled
    ext: str  # image member extension
    ref: str  # file path, "digits:<index>" or "digits-seg:<split>:<index>"
    size: int  # bytes of the image
    mask_ref: str | None = None  # segmentation mask (PNG): file path or "digits-seg-mask:<split>:<index>"
    mask_size: int = 0  # bytes of the mask


@dataclass(slots=True)
class Source:
    name: str
    description: str
    items: list[SourceItem]
    classes: list[str] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        """True for a segmentation source: every item has a mask."""
        return bool(self.items) and all(item.mask_ref is not None for item in self.items)


def sanitize_key(text: str) -> str:
    """A webdataset-safe key: ``[A-Za-z0-9_-]`` only (so no dot), at most 120 characters."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"
    if len(key) > _MAX_KEY:
        key = key[: _MAX_KEY - 13] + "_" + hashlib.sha1(text.encode()).hexdigest()[:12]
    return key


def unique_keys(raw: list[str]) -> list[str]:
    """Sanitised, unique keys for ``raw`` (collisions get ``_1``, ``_2``... in order)."""
    used: set[str] = set()
    out = []
    for text in raw:
        base = sanitize_key(text)
        key, n = base, 0
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        out.append(key)
    return out


def _image_files(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in SOURCE_IMAGE_SUFFIXES:
                found.append(Path(root) / name)
    return found


def image_folder_classes(root: Path) -> list[str]:
    """Class names of an ImageFolder root: its sorted sub-directory names (hidden ones excluded)."""
    classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataConfigError(f"{root}: an ImageFolder root needs one sub-directory per class; found none")
    return classes


def image_folder_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, [(image path, label)]) of ``root/<class>/**/<image>``, classes sorted, files sorted per class.

    The one listing of an ImageFolder: the shard writer, the evaluation inputs and the fine-tuning stream all
    read the same files with the same labels.
    """
    root = Path(root)
    classes = image_folder_classes(root)
    paths: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        paths.extend((p, label) for p in _image_files(root / name))
    if not paths:
        raise DataConfigError(f"{root}: no image files ({', '.join(sorted(SOURCE_IMAGE_SUFFIXES))}) under its classes")
    return classes, paths


def image_folder_source(root: Path) -> Source:
    """``root/<class>/**/<image>``; classes are the sorted sub-directory names."""
    classes, paths = image_folder_files(root)
    keys = unique_keys([str(p.relative_to(root).with_suffix("")) for p, _ in paths])
    items = [
        SourceItem(k, label, SOURCE_IMAGE_SUFFIXES[p.suffix.lower()], str(p), p.stat().st_size)
        for k, (p, label) in zip(keys, paths)
    ]
    return Source(root.name, f"imagefolder:{root.resolve()}", items, classes)


def file_list_source(list_file: Path) -> Source:
    """Lines ``path[<TAB>label]`` (relative paths from the list's directory; ``#`` comments and blanks skipped).

    Integer labels are used as they are; other labels are class names, indexed in sorted order.
    """
    rows: list[tuple[Path, str | None, int]] = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path_text, _, label_text = line.partition("\t")
        path = Path(path_text.strip())
        if not path.is_absolute():
            path = list_file.parent / path
        if path.suffix.lower() not in SOURCE_IMAGE_SUFFIXES:
            raise DataConfigError(f"{list_file}:{lineno}: {path} is not an image file ({path.suffix!r})")
        if not path.is_file():
            raise DataConfigError(f"{list_file}:{lineno}: {path} does not exist")
        rows.append((path, label_text.strip() or None, lineno))
    if not rows:
        raise DataConfigError(f"{list_file}: no image paths listed")
    labels_text = [lab for _, lab, _ in rows if lab is not None]
    classes: list[str] = []
    if labels_text and not all(re.fullmatch(r"-?\d+", lab) for lab in labels_text):
        classes = sorted(set(labels_text))
    index = {name: i for i, name in enumerate(classes)}

    def label_of(text: str | None) -> int:
        if text is None:
            return -1
        return index[text] if classes else int(text)

    common = os.path.commonpath([str(p.parent) for p, _, _ in rows])
    keys = unique_keys([os.path.relpath(p.with_suffix(""), common) for p, _, _ in rows])
    items = [
        SourceItem(k, label_of(lab), SOURCE_IMAGE_SUFFIXES[p.suffix.lower()], str(p), p.stat().st_size)
        for k, (p, lab, _) in zip(keys, rows)
    ]
    return Source(list_file.stem, f"filelist:{list_file.resolve()}", items, classes)


@functools.lru_cache(maxsize=1)
def digits_png_bytes() -> tuple[tuple[bytes, ...], tuple[int, ...]]:
    """All 1797 scikit-learn digits as 32x32 RGB PNGs (8x8 values 0-16 -> [0,1] -> bilinear, align_corners=False)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    big = F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    rgb = big.mul(255.0).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    encoded = []
    for image in rgb:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return tuple(encoded), tuple(int(t) for t in digits.target)


def digits_split_indices(split: str) -> list[int]:
    """Original indices of the digits ``split``: randperm(1797, seed 0), first 1297 train, last 500 val."""
    import torch

    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0)).tolist()
    if split == "train":
        return perm[:DIGITS_TRAIN]
    if split == "val":
        return perm[DIGITS_TRAIN:]
    raise DataConfigError(f"builtin:digits has splits 'train' and 'val', not {split!r}")


def digits_source(split: str) -> Source:
    images, targets = digits_png_bytes()
    items = [
        SourceItem(f"digit{i:04d}", targets[i], "png", f"digits:{i}", len(images[i]))
        for i in digits_split_indices(split)
    ]
    return Source("digits", DIGITS_SPEC, items, [str(d) for d in range(10)])


def digits_seg_source(split: str) -> Source:
    """``builtin:digits-seg``: canvases of digits with their masks (see :mod:`ssl_vil.data.digits_seg`)."""
    images, masks = digits_seg_png_bytes(split)
    items = [
        SourceItem(key, -1, "png", f"digits-seg:{split}:{n}", len(images[n]), f"digits-seg-mask:{split}:{n}",
                   len(masks[n]))
        for n, key in enumerate(digits_seg_keys(split))
    ]
    return Source("digits-seg", DIGITS_SEG_SPEC, items, list(DIGITS_SEG_CLASSES))


def read_class_names(path: Path) -> list[str]:
    """One class name per line (index = line number, from 0); names must be non-empty and distinct."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DataConfigError(f"{path}: cannot read the class names ({exc})") from exc
    names = [line.strip() for line in lines]
    for lineno, name in enumerate(names, 1):
        if not name:
            raise DataConfigError(f"{path}:{lineno}: empty class name (line n names mask value n - 1)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataConfigError(f"{path}: class names repeat: {repeated[:10]}")
    if not names:
        raise DataConfigError(f"{path}: no class names (expected one per line)")
    return names


def mask_for(image: Path, images_root: Path, masks_root: Path) -> Path:
    """The mask of ``images_root/<rel>/<stem>.<ext>``: ``masks_root/<rel>/<stem>.png``."""
    return (masks_root / image.relative_to(images_root)).with_suffix(MASK_SUFFIX)


def mask_folder_source(images_root: Path, masks_root: Path, classes_file: Path | None = None) -> Source:
    """Images ``images_root/**/<image>`` (flat or nested; sub-directories are not classes) with their masks.

    The mask of ``images_root/<rel>/<stem>.<ext>`` is ``masks_root/<rel>/<stem>.png``; every image needs one, so
    a missing mask is refused here, before anything is written. Labels are -1; ``classes`` are the names of the
    mask values, from ``classes_file`` (one per line), or empty when not given.
    """
    images_root, masks_root = Path(images_root), Path(masks_root)
    for role, directory in (("images", images_root), ("masks", masks_root)):
        if not directory.is_dir():
            raise DataConfigError(f"{directory}: the {role} directory does not exist")
    inner = masks_root.resolve()
    # A masks tree inside the images tree would otherwise list its PNGs as images.
    paths = [p for p in _image_files(images_root) if not p.resolve().is_relative_to(inner)]
    if not paths:
        raise DataConfigError(f"{images_root}: no image files ({', '.join(sorted(SOURCE_IMAGE_SUFFIXES))})")
    masks = [mask_for(p, images_root, masks_root) for p in paths]
    missing = [(p, m) for p, m in zip(paths, masks) if not m.is_file()]
    if missing:
        image, mask = missing[0]
        more = f" ({len(missing) - 1} more images lack their masks)" if len(missing) > 1 else ""
        raise DataConfigError(f"image {image} has no mask: expected {mask}{more}")
    classes = read_class_names(classes_file) if classes_file is not None else []
    keys = unique_keys([str(p.relative_to(images_root).with_suffix("")) for p in paths])
    items = [
        SourceItem(k, -1, SOURCE_IMAGE_SUFFIXES[p.suffix.lower()], str(p), p.stat().st_size, str(m), m.stat().st_size)
        for k, p, m in zip(keys, paths, masks)
    ]
    return Source(images_root.name, f"imagefolder:{images_root.resolve()}+masks:{masks_root.resolve()}", items,
                  classes)


def open_source(spec: str, split: str, *, masks: Path | None = None, mask_classes: Path | None = None) -> Source:
    """The source named by ``spec``: ``builtin:digits``, ``builtin:digits-seg``, an ImageFolder directory, or a
    text file list; with ``masks``, an image directory whose masks are under ``masks`` (see
    :func:`mask_folder_source`), ``mask_classes`` naming the mask values."""
    if spec == DIGITS_SEG_SPEC:
        if masks is not None or mask_classes is not None:
            raise DataConfigError(f"{DIGITS_SEG_SPEC} carries its own masks and class names; drop --masks and "
                                  "--mask-classes")
        return digits_seg_source(split)
    if masks is not None:
        if not Path(spec).is_dir():
            raise DataConfigError(f"--masks needs SRC to be a directory of images; {spec!r} is not one")
        return mask_folder_source(Path(spec), Path(masks), mask_classes)
    if mask_classes is not None:
        raise DataConfigError("--mask-classes names mask values; it needs --masks DIR")
    if spec == DIGITS_SPEC:
        return digits_source(split)
    path = Path(spec)
    if path.is_dir():
        return image_folder_source(path)
    if path.is_file():
        return file_list_source(path)
    raise DataConfigError(
        f"source {spec!r} is neither {DIGITS_SPEC}, {DIGITS_SEG_SPEC}, a directory, nor a list file"
    )


def _read_ref(ref: str) -> bytes:
    """The bytes a source reference names: a built-in image or mask (in memory), else a file."""
    kind, _, rest = ref.partition(":")
    if kind == "digits":
        return digits_png_bytes()[0][int(rest)]
    if kind in ("digits-seg", "digits-seg-mask"):
        split, _, index = rest.partition(":")
        return digits_seg_png_bytes(split)[0 if kind == "digits-seg" else 1][int(index)]
    with open(ref, "rb") as handle:
        return handle.read()


def read_item_bytes(item: SourceItem) -> bytes:
    return _read_ref(item.ref)


def read_mask_bytes(item: SourceItem) -> bytes | None:
    """The mask PNG of a segmentation item, None for an item without a mask."""
    return None if item.mask_ref is None else _read_ref(item.mask_ref)
