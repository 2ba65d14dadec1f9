"""Random access to (image, mask) pairs for semantic segmentation.

:func:`open_seg_pairs` opens one of

- a shard directory written by ``python -m ssl_vil.data.make_shards`` with masks (``--masks DIR`` or
  ``builtin:digits-seg``): each record holds its image and ``<key>.mask.png``. The shards are indexed once when
  opened (the stdlib ``tarfile`` reads the member headers; for each key the data offset and size of the image and
  of the mask), and a pair is then read with two seek + read calls, so any index is equally cheap. Only local,
  uncompressed shards can be indexed like this;
- a folder with ``images/`` and ``masks/`` (the mask of ``images/<rel>/<stem>.<ext>`` is
  ``masks/<rel>/<stem>.png``) and optionally ``classes.txt`` (one mask class name per line); keys are the ones
  ``make_shards --masks`` gives the same images, so a folder and its shards list the same pairs;
- ``builtin:digits-seg`` with split ``train`` or ``val`` (in memory, no files; see :mod:`ssl_vil.data.digits_seg`).

Pairs come in a fixed order: shard order then tar order, or sorted relative paths. A :class:`SegPairs` is a
map-style dataset that pickles without open files (each process opens the files it reads, lazily), so it works
in ``torch.utils.data.DataLoader`` workers whatever the start method. Encoded bytes are returned as stored;
decoding (and the mask's 255 = ignore convention) is the consumer's.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ssl_vil.data.digits_seg import DIGITS_SEG_SIZES, DIGITS_SEG_SPEC
from ssl_vil.data.errors import DataConfigError
from ssl_vil.data.manifest import list_splits, read_manifest
from ssl_vil.data.sources import (
    MASK_MEMBER,
    Source,
    digits_seg_source,
    mask_folder_source,
    read_item_bytes,
    read_mask_bytes,
)
from ssl_vil.data.tar_records import image_member, is_local, local_path, split_member_name

FOLDER_IMAGES = "images"
FOLDER_MASKS = "masks"
FOLDER_CLASSES = "classes.txt"
# Open shard files kept per process; a split of thousands of shards must not exhaust file descriptors.
_MAX_OPEN_SHARDS = 32
# Member names are bytes in a tar; decoded as the record readers do, so keys agree with theirs.
_NAME_ENCODING, _NAME_ERRORS = "utf-8", "surrogateescape"
_EXPECTED = ("a shard directory written by make_shards with masks (manifest-<split>.json), a folder with "
             f"{FOLDER_IMAGES}/ and {FOLDER_MASKS}/ sub-directories, or {DIGITS_SEG_SPEC}")


@dataclass(frozen=True, slots=True)
class SegPair:
    """One segmentation sample, still encoded."""

    key: str
    image: bytes  # encoded image
    mask: bytes  # encoded mask PNG: one class index per pixel (mode L or P), 255 = ignore


class SegPairs:
    """Map-style dataset of :class:`SegPair`; made by :func:`open_seg_pairs`.

    ``source`` says what was opened (for messages); ``classes[i]`` names mask value ``i`` (empty when unknown).
    """

    def __init__(self, source: str, classes: Sequence[str], keys: Sequence[str]) -> None:
        self.source = source
        self.classes = list(classes)
        self._keys = tuple(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> SegPair:
        n = len(self._keys)
        position = int(index)
        if position < 0:
            position += n
        if not 0 <= position < n:
            raise IndexError(f"{self.source}: pair {index} requested, there are {n}")
        image, mask = self._read(position)
        return SegPair(self._keys[position], image, mask)

    def keys(self) -> list[str]:
        """The keys of all pairs, in index order."""
        return list(self._keys)

    def _read(self, position: int) -> tuple[bytes, bytes]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} pairs, {len(self.classes)} classes)"


class _SourcePairs(SegPairs):
    """Pairs of a segmentation :class:`~ssl_vil.data.sources.Source` (an images/ + masks/ folder, or
    ``builtin:digits-seg``), read through the shard writer's own readers."""

    def __init__(self, source: str, data: Source) -> None:
        super().__init__(source, data.classes, [item.key for item in data.items])
        self._items = tuple(data.items)

    def _read(self, position: int) -> tuple[bytes, bytes]:
        item = self._items[position]
        try:
            image = read_item_bytes(item)
            mask = read_mask_bytes(item)
        except OSError as exc:
            raise DataConfigError(f"{self.source}: cannot read pair {item.key!r} ({item.ref}, {item.mask_ref}): "
                                  f"{exc}") from exc
        assert mask is not None  # a segmentation source gives every item a mask
        return image, mask


class _ShardPairs(SegPairs):
    """Pairs of local tar shards, read by offset from the index built when opened."""

    def __init__(self, source: str, classes: Sequence[str], files: Sequence[str], keys: Sequence[str],
                 spans: np.ndarray) -> None:
        super().__init__(source, classes, keys)
        self._files = tuple(files)
        self._spans = spans  # (N, 5) int64: file index, image offset, image size, mask offset, mask size
        self._handles: OrderedDict[int, IO[bytes]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()  # file handles stay in the process that opened them
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _handle(self, file_index: int) -> IO[bytes]:
        if self._pid != os.getpid():
            # A forked worker shares its parent's open files, and with them the file offsets: open its own.
            self._handles = OrderedDict()
            self._pid = os.getpid()
        handle = self._handles.get(file_index)
        if handle is not None:
            self._handles.move_to_end(file_index)
            return handle
        path = self._files[file_index]
        try:
            handle = open(path, "rb")
        except OSError as exc:
            raise DataConfigError(f"{path}: cannot open the shard ({exc})") from exc
        self._handles[file_index] = handle
        if len(self._handles) > _MAX_OPEN_SHARDS:
            self._handles.popitem(last=False)[1].close()
        return handle

    def _read(self, position: int) -> tuple[bytes, bytes]:
        file_index, image_offset, image_size, mask_offset, mask_size = (int(v) for v in self._spans[position])
        handle = self._handle(file_index)
        out = []
        for offset, size in ((image_offset, image_size), (mask_offset, mask_size)):
            handle.seek(offset)
            data = handle.read(size)
            if len(data) != size:
                raise DataConfigError(f"{self._files[file_index]}: key {self._keys[position]!r}: read {len(data)} of "
                                      f"{size} bytes at offset {offset}; the shard changed since it was opened")
            out.append(data)
        return out[0], out[1]

    def close(self) -> None:
        """Close the shard files this process opened (later reads reopen them)."""
        while self._handles:
            self._handles.popitem()[1].close()


def _index_shard(path: str, expected: int) -> list[tuple[str, int, int, int, int]]:
    """(key, image offset, image size, mask offset, mask size) of every record of the tar shard ``path``."""
    try:
        size = os.path.getsize(path)
        tar = tarfile.open(path, mode="r:", encoding=_NAME_ENCODING, errors=_NAME_ERRORS)
    except (OSError, tarfile.TarError) as exc:
        raise DataConfigError(f"{path}: not a readable uncompressed tar shard ({exc})") from exc
    records: list[tuple[str, int, int, int, int]] = []

    def flush(key: str | None, members: dict[str, tarfile.TarInfo]) -> None:
        if key is None:
            return
        ext = image_member({e: b"" for e in members})
        if ext is None:
            raise DataConfigError(f"{path}: record {key!r} has no image member (members: {sorted(members)})")
        if MASK_MEMBER not in members:
            raise DataConfigError(f"{path}: record {key!r} has no {MASK_MEMBER} member: write the shards with "
                                  "make_shards --masks")
        image, mask = members[ext], members[MASK_MEMBER]
        for info in (image, mask):
            if info.offset_data + info.size > size:
                raise DataConfigError(f"{path}: member {info.name} ends at byte {info.offset_data + info.size} of a "
                                      f"{size}-byte file; the shard is truncated")
        records.append((key, image.offset_data, image.size, mask.offset_data, mask.size))

    key: str | None = None
    members: dict[str, tarfile.TarInfo] = {}
    with tar:
        try:
            for info in tar:
                if not info.isfile():
                    continue
                member_key, ext = split_member_name(info.name)
                # A record is a run of members sharing a key; a repeated member starts a new one (as readers do).
                if member_key != key or ext in members:
                    flush(key, members)
                    key, members = member_key, {}
                members[ext] = info
        except tarfile.TarError as exc:
            raise DataConfigError(f"{path}: the tar is corrupt after {len(records)} records ({exc})") from exc
    flush(key, members)
    if len(records) != expected:
        raise DataConfigError(f"{path}: holds {len(records)} records but its manifest lists {expected}")
    return records


def _open_shards(root: Path, split: str | None) -> SegPairs:
    manifest = read_manifest(root, split)
    name = f"{root} [split {manifest.split}]"
    files: list[str] = []
    keys: list[str] = []
    spans: list[tuple[int, int, int, int, int]] = []
    seen: dict[str, str] = {}
    for file_index, (url, shard) in enumerate(zip(manifest.urls, manifest.shards)):
        files.append(url)
        for key, *span in _index_shard(url, shard.num_samples):
            if key in seen:
                raise DataConfigError(f"{url}: key {key!r} repeats (first in {seen[key]}); a pair needs a unique key")
            seen[key] = url
            keys.append(key)
            spans.append((file_index, *span))
    table = np.asarray(spans, dtype=np.int64).reshape(-1, 5)
    return _ShardPairs(name, manifest.classes, files, keys, table)


def _open_folder(root: Path) -> SegPairs:
    classes_file = root / FOLDER_CLASSES
    data = mask_folder_source(root / FOLDER_IMAGES, root / FOLDER_MASKS,
                              classes_file if classes_file.is_file() else None)
    return _SourcePairs(str(root), data)


def open_seg_pairs(location: str, split: str | None = None) -> SegPairs:
    """The (image, mask) pairs at ``location``: a shard directory, an ``images/`` + ``masks/`` folder, or
    ``builtin:digits-seg`` (see the module docstring).

    ``split``: for a shard directory, which ``manifest-<split>.json`` (may be omitted when there is only one); for
    ``builtin:digits-seg``, ``train`` or ``val`` (required); a folder is one split and does not use it.
    Raises :class:`~ssl_vil.data.errors.DataConfigError` naming the file or key and what was expected.
    """
    location = str(location)
    if location == DIGITS_SEG_SPEC:
        if split not in DIGITS_SEG_SIZES:
            raise DataConfigError(f"{DIGITS_SEG_SPEC} needs split 'train' or 'val', got {split!r}")
        return _SourcePairs(f"{DIGITS_SEG_SPEC} [split {split}]", digits_seg_source(split))
    if not is_local(location):
        raise DataConfigError(f"{location}: segmentation pairs are read from local files only (shards are indexed by "
                              "byte offset); copy the shard directory to a local disk")
    root = Path(local_path(location))
    if not root.is_dir():
        raise DataConfigError(f"{root}: no such directory; expected {_EXPECTED}")
    if list_splits(root):
        return _open_shards(root, split)
    if (root / FOLDER_IMAGES).is_dir() and (root / FOLDER_MASKS).is_dir():
        return _open_folder(root)
    raise DataConfigError(f"{root}: neither manifest-<split>.json nor {FOLDER_IMAGES}/ and {FOLDER_MASKS}/ found; "
                          f"expected {_EXPECTED}")
