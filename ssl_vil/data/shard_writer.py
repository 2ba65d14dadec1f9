"""Planning and writing WebDataset shards from a :class:`~ssl_vil.data.sources.Source`.

The plan (which item goes to which shard) is a pure function of the source and the options, and its digest is
recorded, so an interrupted run can be resumed and a finished one recognised. Each shard is written to a hidden
temporary and renamed into place when complete (:func:`ssl_vil.infra.files.atomic_output`), so a shard file that
exists is a whole shard. Image bytes are stored as they are (no re-encoding); each record holds
``<key>.<ext>`` (the image), ``<key>.cls`` (integer label, when labelled) and ``<key>.json``
(``{"source": ..., "class": ...}``). A segmentation item's record also holds ``<key>.mask.png`` (its mask, as
stored; member extension ``mask.png``, which no image reader takes for the image) and ``"mask": <mask source>`` in
its json. Tar member times are fixed (mtime 0) so equal inputs give equal shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from ssl_vil.data.seeding import permutation, stable_seed
from ssl_vil.data.sources import MASK_MEMBER, Source, SourceItem, read_item_bytes, read_mask_bytes
from ssl_vil.infra.files import atomic_output

PLAN_FORMAT = "ssl_vil.shard-plan/1"
MASK_MODES = ("L", "P")  # one class index per pixel
_TAR_BLOCK = 512


@dataclass(slots=True)
class ShardPlan:
    prefix: str  # shard files are <prefix>-000000.tar, ...
    shards: list[list[SourceItem]]
    options: dict[str, object]
    digest: str

    def filename(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"


@dataclass(slots=True)
class ShardResult:
    file: str
    num_samples: int
    sha256: str
    bytes: int
    skipped: list[tuple[str, str]]  # (source ref, reason)


def _padded(size: int) -> int:
    return -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_bytes(item: SourceItem) -> int:
    """Estimated tar bytes of one record: image, cls and json members with their headers (and the mask's)."""
    mask = 0 if item.mask_ref is None else _padded(item.mask_size) + _TAR_BLOCK
    return _padded(item.size) + 3 * _TAR_BLOCK + 2 * _TAR_BLOCK + mask


def plan_shards(
    source: Source, split: str, *, maxcount: int, maxsize: int, shuffle_seed: int | None, verify: bool,
    classes_from: str | None = None,
) -> ShardPlan:
    """Cut ``source`` into shards of at most ``maxcount`` records and (except single records) ``maxsize`` bytes.

    ``classes_from``: where the class list of a relabelled source came from; it and the list join the options
    (and the digest), so shards indexed by another list are never taken for these.
    """
    if maxcount < 1 or maxsize < 1:
        raise ValueError(f"maxcount and maxsize must be >= 1, got {maxcount}, {maxsize}")
    items = list(source.items)
    if shuffle_seed is not None:
        # Sources are usually sorted by class; shuffling at write time keeps each shard's records class-mixed.
        items = [items[i] for i in permutation(len(items), stable_seed(shuffle_seed, "make_shards", split))]
    shards: list[list[SourceItem]] = []
    current: list[SourceItem] = []
    current_bytes = 0
    for item in items:
        size = _tar_bytes(item)
        if current and (len(current) >= maxcount or current_bytes + size > maxsize):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += size
    if current:
        shards.append(current)
    options: dict[str, object] = {"maxcount": maxcount, "maxsize": maxsize, "shuffle_seed": shuffle_seed,
                                  "verify": verify}
    if classes_from is not None:
        options["classes_from"] = classes_from
        options["classes"] = list(source.classes)
    if source.has_masks:
        # The mask value names (e.g. from --mask-classes) go to the manifest: another list is another output.
        options["masks"] = True
        options["mask_classes"] = list(source.classes)
    h = hashlib.sha256(json.dumps({"source": source.description, "split": split, "options": options}).encode())
    for index, shard in enumerate(shards):
        for item in shard:
            # The mask joins the line only when there is one, so plans of sources without masks keep their digests.
            mask = "" if item.mask_ref is None else f"\t{item.mask_ref}\t{item.mask_size}"
            h.update(f"{index}\t{item.key}\t{item.label}\t{item.ext}\t{item.ref}\t{item.size}{mask}\n".encode())
    return ShardPlan(f"{source.name}-{split}", shards, options, h.hexdigest())


def _check_image(data: bytes, verify: bool) -> str | None:
    """None if ``data`` opens as an image (fully decodes, with ``verify``), else the reason it does not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if verify:
                    image.load()
        return None
    except Exception as exc:  # PIL raises many types for bad bytes
        return f"{type(exc).__name__}: {exc}"


def _check_mask(mask: bytes, image: bytes, verify: bool) -> str | None:
    """None if ``mask`` is a one-channel (``L`` / ``P``) image of the image's size, else what is wrong with it."""
    problem = _check_image(mask, verify)
    if problem is not None:
        return f"mask is not a decodable image: {problem}"
    with Image.open(io.BytesIO(mask)) as m, Image.open(io.BytesIO(image)) as i:
        if m.mode not in MASK_MODES:
            return f"mask has mode {m.mode}, expected one class index per pixel (mode {' or '.join(MASK_MODES)})"
        if m.size != i.size:
            return f"mask is {m.size[0]}x{m.size[1]} but its image is {i.size[0]}x{i.size[1]}"
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(
    path: Path,
    items: list[SourceItem],
    classes: list[str],
    *,
    verify: bool,
    on_item: Callable[[], None] | None = None,
) -> ShardResult:
    """Write ``items`` as one shard at ``path`` (atomically); unreadable or non-image files are skipped, and so
    are segmentation items whose mask is unreadable, not one-channel or not of the image's size."""
    skipped: list[tuple[str, str]] = []
    count = 0
    with atomic_output(path) as handle:
        writer = wds.TarWriter(handle, mtime=0)
        try:
            for item in items:
                try:
                    data = read_item_bytes(item)
                except OSError as exc:
                    skipped.append((item.ref, f"unreadable: {exc}"))
                    continue
                problem = _check_image(data, verify)
                if problem is not None:
                    skipped.append((item.ref, f"not a decodable image: {problem}"))
                    continue
                try:
                    mask = read_mask_bytes(item)
                except OSError as exc:
                    skipped.append((item.ref, f"mask {item.mask_ref} unreadable: {exc}"))
                    continue
                if mask is not None:
                    problem = _check_mask(mask, data, verify)
                    if problem is not None:
                        skipped.append((item.ref, f"{problem} ({item.mask_ref})"))
                        continue
                meta: dict[str, object] = {"source": item.ref}
                if 0 <= item.label < len(classes):
                    meta["class"] = classes[item.label]
                sample: dict[str, object] = {"__key__": item.key, item.ext: data, "json": meta}
                if mask is not None:
                    meta["mask"] = item.mask_ref
                    sample[MASK_MEMBER] = mask
                if item.label >= 0:
                    sample["cls"] = item.label
                writer.write(sample)
                count += 1
                if on_item is not None:
                    on_item()
        finally:
            # Close before the temporary is renamed (success) or deleted (failure), never after.
            writer.close()
    return ShardResult(path.name, count, file_sha256(path), path.stat().st_size, skipped)
