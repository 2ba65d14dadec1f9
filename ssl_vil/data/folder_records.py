"""An image directory read as virtual shards, so the training stream treats it exactly like tar shards.

A directory of class sub-directories (torchvision ImageFolder: ``root/<class>/**/<image>``, label = index of the
class in the sorted sub-directory names) or a flat directory of images (no labels) is listed once, in the sorted
order of :func:`ssl_vil.data.sources.image_folder_files`, and cut into chunks of :data:`FOLDER_CHUNK_FILES`
files. Each chunk is a virtual shard whose records are its files, so the slot layout, the window shuffle, the
per-key seeding and the resumable cursor of :mod:`ssl_vil.data.train_stream` apply unchanged: every file is read
once per epoch, whatever the worker count.

A file's record holds the members a shard record would (``{<image ext>: bytes, "cls": b"<label>"}``), so it is
decoded by :func:`ssl_vil.data.decode.decode_record` like any shard record. Its key is its path relative to the
root without the extension (``"cat/img_001"``); files that differ only by extension keep it, so keys stay unique.
A file that cannot be read, is larger than ``max_record_bytes`` or does not decode is a bad record: counted,
replaced by padding and charged to the error budget, with the file's path as the issue's location.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ssl_vil.data.errors import DataConfigError, DataIssue
from ssl_vil.data.shardlist import ShardSet
from ssl_vil.data.sources import SOURCE_IMAGE_SUFFIXES, image_folder_files
from ssl_vil.data.tar_records import MAX_RECORD_BYTES, RawRecord

# Files per virtual shard. Files are read one by one, so a chunk costs nothing to open; chunks only give the epoch
# layout units to permute, and small ones mix the sorted (class-ordered) listing well across slots and epochs.
FOLDER_CHUNK_FILES = 64
FOLDER_URL_PREFIX = "imagefolder:"


def is_image_folder(path: str | os.PathLike[str]) -> bool:
    """A local directory without shards or manifests (those make it a shard directory)."""
    directory = Path(path)
    if not directory.is_dir():
        return False
    return not any(e.suffix == ".tar" or (e.name.startswith("manifest-") and e.suffix == ".json")
                   for e in directory.iterdir())


@dataclass(frozen=True, slots=True)
class FolderListing:
    """The sorted files of an image directory (paths relative to ``root``), their labels and keys."""

    root: str
    files: tuple[str, ...]
    labels: tuple[int, ...]
    keys: tuple[str, ...]
    classes: tuple[str, ...]
    chunk: int = FOLDER_CHUNK_FILES

    @property
    def num_chunks(self) -> int:
        return -(-len(self.files) // self.chunk)

    def chunk_url(self, index: int) -> str:
        return f"{FOLDER_URL_PREFIX}{self.root}#{index:06d}"

    def chunk_counts(self) -> tuple[int, ...]:
        return tuple(min(self.chunk, len(self.files) - i * self.chunk) for i in range(self.num_chunks))

    def digest(self) -> str:
        """Identity of the listing (relative paths, labels, classes), independent of where the folder is mounted."""
        h = hashlib.sha256()
        h.update("\x1f".join(self.classes).encode("utf-8", "surrogatepass"))
        for rel, label in zip(self.files, self.labels):
            h.update(f"\n{rel}\t{label}".encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:16]

    def open_chunk(self, index: int) -> FolderChunkReader:
        return FolderChunkReader(self, index)


def list_image_folder(root: str | os.PathLike[str], *, chunk: int = FOLDER_CHUNK_FILES) -> FolderListing:
    """The listing of ``root``: class sub-directories when it has any (ImageFolder), else its image files."""
    directory = Path(root).resolve()
    if any(d.is_dir() and not d.name.startswith(".") for d in directory.iterdir()):
        classes, paths = image_folder_files(directory)
    else:
        classes = []
        paths = [(p, -1) for p in sorted(directory.iterdir())
                 if p.is_file() and p.suffix.lower() in SOURCE_IMAGE_SUFFIXES]
        if not paths:
            raise DataConfigError(
                f"{directory}: neither shards (*.tar, manifest-<split>.json) nor images: expected class "
                f"sub-directories of images or image files ({', '.join(sorted(SOURCE_IMAGE_SUFFIXES))})",
                key="train")
    files = tuple(p.relative_to(directory).as_posix() for p, _ in paths)
    stems = [os.path.splitext(f)[0] for f in files]
    seen: dict[str, int] = {}
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
    keys = tuple(stem if seen[stem] == 1 else f for stem, f in zip(stems, files))
    return FolderListing(str(directory), files, tuple(label for _, label in paths), keys, tuple(classes), chunk)


def folder_shard_set(root: str | os.PathLike[str], *, chunk: int = FOLDER_CHUNK_FILES) -> ShardSet:
    """The virtual shards of an image directory (see the module docstring)."""
    listing = list_image_folder(root, chunk=chunk)
    urls = tuple(listing.chunk_url(i) for i in range(listing.num_chunks))
    return ShardSet(urls, listing.chunk_counts(), listing.classes, folder=listing)


class FolderChunkReader:
    """The records of one chunk of a :class:`FolderListing`; files are opened one by one, in any order."""

    def __init__(self, listing: FolderListing, index: int, max_record_bytes: int | None = None) -> None:
        self.listing = listing
        self.index = index
        self.url = listing.chunk_url(index)
        self.max_record_bytes = MAX_RECORD_BYTES if max_record_bytes is None else max_record_bytes
        self._next = 0

    @property
    def position(self) -> int:
        return self._next

    def read(self, start: int, stop: int) -> list[RawRecord]:
        first = self.index * self.listing.chunk
        count = min(self.listing.chunk, len(self.listing.files) - first)
        if not 0 <= start <= stop <= count:
            raise IndexError(f"{self.url}: records {start}..{stop} requested but the chunk has {count} files")
        out = [self._record(first + i, i) for i in range(start, stop)]
        self._next = stop
        return out

    def _record(self, file_index: int, record: int) -> RawRecord:
        rel = self.listing.files[file_index]
        key = self.listing.keys[file_index]
        path = os.path.join(self.listing.root, rel)
        try:
            with open(path, "rb") as handle:
                data = handle.read(self.max_record_bytes + 1)  # one byte past the bound tells "too large"
        except OSError as exc:
            return self._bad(DataIssue("undecodable_image", path, record, key, f"cannot read the file: {exc}"), path)
        if len(data) > self.max_record_bytes:
            return self._bad(DataIssue("oversized_record", path, record, key,
                                       f"file is larger than max_record_bytes={self.max_record_bytes}"), path)
        members = {SOURCE_IMAGE_SUFFIXES[os.path.splitext(rel)[1].lower()]: data}
        label = self.listing.labels[file_index]
        if label >= 0:
            members["cls"] = str(label).encode("ascii")
        return RawRecord(record, key, members, source=path)

    def _bad(self, issue: DataIssue, path: str) -> RawRecord:
        return RawRecord(issue.record, issue.key, None, error=issue, events=(issue,), source=path)

    def close(self) -> None:
        """Nothing stays open between files."""
