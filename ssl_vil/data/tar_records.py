"""Reading the records of one tar shard, with every failure turned into a typed :class:`DataIssue`.

A *record* is a run of consecutive tar members that share a key (the member path up to the first dot of its
basename, as webdataset groups them); a repeated member name starts a new record. Records are numbered 0, 1, ...
in tar order; that index is the record's position in the shard and is what a shard's sample count counts.

Local files are opened seekable, so skipping records reads 512-byte headers only; other URLs (``http(s)://``,
``pipe:`` ...) are streamed through ``webdataset.gopen`` and skipping reads through the bytes.

Hostile content: member names are decoded as UTF-8 with ``surrogateescape``, so any byte string is a key (the
same one on every machine, whatever the locale). No record is loaded whose members declare more than
``max_record_bytes`` (:data:`MAX_RECORD_BYTES`) in total: it is an ``oversized_record``, skipped without reading
its bytes into memory. Every read tarfile makes is bounded too (a PAX or GNU long-name header declaring gigabytes
in a small file would otherwise be allocated in full before the short read is noticed): it is done in chunks, so
memory follows the bytes actually present, and a single read above the bound is a corrupt shard.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import webdataset as wds

from ssl_vil.data.errors import DataIssue

# Member extensions that hold an image (compared lower-case); the first one present in a record is used.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm")

# Largest record (sum of its members' sizes) that is loaded; a training record is one encoded image plus small
# sidecars, and raw records of a whole shuffle window are held per slot, so anything larger is not a sample.
MAX_RECORD_BYTES = 256 << 20
# Reads are split into chunks of at most this size, so a short file never causes a large allocation.
_READ_CHUNK = 1 << 20
# Member names are bytes in a tar; this makes every name a key, independent of the locale.
_NAME_ENCODING, _NAME_ERRORS = "utf-8", "surrogateescape"


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/abc.seg.png"`` -> ``("dir/abc", "seg.png")``: the key ends at the first dot of the basename."""
    head, sep, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if sep else stem), ext


def is_local(url: str) -> bool:
    """True for plain paths and ``file:`` URLs, which are opened seekable."""
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    for prefix in ("file://", "file:"):
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url


def image_member(members: dict[str, bytes]) -> str | None:
    """The extension of the record's image member, or None when it has none."""
    lowered = {ext.lower(): ext for ext in members}
    for ext in IMAGE_EXTENSIONS:
        if ext in lowered:
            return lowered[ext]
    return None


class _BoundedReads:
    """Proxy for the file object tarfile reads from: reads in chunks and refuses one read above ``limit`` bytes.

    tarfile reads a PAX / GNU long-name header or a member in one ``read(declared size)`` call, and a buffered
    file allocates that size before reading; chunking makes memory follow the bytes actually there.
    """

    def __init__(self, raw: IO[bytes] | Any, limit: int) -> None:
        self.raw = raw
        self.limit = limit

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.limit + 1  # tarfile always passes a size; an unbounded read is refused like a huge one
        if size > self.limit:
            raise tarfile.ReadError(f"a header or member declares {size} bytes, above the {self.limit}-byte bound")
        if size <= _READ_CHUNK:
            return self.raw.read(size)
        chunks: list[bytes] = []
        left = size
        while left > 0:
            chunk = self.raw.read(min(left, _READ_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def __getattr__(self, name: str) -> Any:  # seek, tell, close, comptype ...
        return getattr(self.raw, name)


class _CountingReader:
    """Read-only stream wrapper that counts bytes and notes the end of data (to spot a cut tar header)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.total = 0
        self.at_end = False

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.total += len(data)
        if not data and size != 0:
            self.at_end = True
        return data

    def close(self) -> None:
        self.raw.close()


@dataclass(slots=True)
class RawRecord:
    """Record ``index`` of a shard: its members' bytes, or ``error`` saying why no sample is there.

    ``events`` are the issues to count when this position is delivered: the record's own problem, a shard failure
    first seen at this record, or a surplus of records after the last planned one. Each issue is attached to
    exactly one position, so counting at delivery counts it once however the shard is split between readers.
    """

    index: int
    key: str | None
    members: dict[str, bytes] | None
    error: DataIssue | None = None
    events: tuple[DataIssue, ...] = field(default=())
    source: str | None = None  # where the bytes are when not in the shard itself (a folder record's file)


class RecordReader(Protocol):
    """What :class:`PieceReader` reads a shard with: :class:`ShardRecordReader` or a folder chunk's reader."""

    url: str

    @property
    def position(self) -> int: ...

    def read(self, start: int, stop: int) -> list[RawRecord]: ...

    def close(self) -> None: ...


class ShardRecordReader:
    """Sequential reader of one shard's records; ``read(start, stop)`` may skip ahead but never go back.

    ``expected`` is the record count the manifest lists: reaching the end of the tar earlier is a
    ``truncated_shard`` failure at that record, and a record after the last expected one is ``extra_records``.
    Once the shard fails, every later record is a hole carrying the failure (counted only at the failing record).
    """

    def __init__(self, url: str, expected: int | None, max_record_bytes: int | None = None) -> None:
        """``max_record_bytes``: None means :data:`MAX_RECORD_BYTES` (read when the reader is made)."""
        self.url = url
        self.expected = expected
        self.max_record_bytes = MAX_RECORD_BYTES if max_record_bytes is None else max_record_bytes
        self._file: IO[bytes] | _BoundedReads | _CountingReader | None = None
        self._tar: tarfile.TarFile | None = None
        self._seekable = is_local(url)
        self._opened = False
        self._next = 0
        self._pending: tuple[tarfile.TarInfo, bytes | None] | None = None
        self._eof = False
        self._keys_seen: set[str] = set()
        self._failure: DataIssue | None = None
        self._deferred: tuple[int, str, str | None] | None = None  # failure met while peeking past a record

    @property
    def position(self) -> int:
        """Index of the next record ``read`` would produce."""
        return self._next

    def read(self, start: int, stop: int) -> list[RawRecord]:
        """Records ``start .. stop - 1`` (loaded), skipping records between the current position and ``start``."""
        if start < self._next:
            raise ValueError(f"{self.url}: cannot go back from record {self._next} to {start}; open a new reader")
        out: list[RawRecord] = []
        while self._next < stop:
            record = self._read_one(load=self._next >= start, load_next=self._next + 1 >= start)
            if record is None:
                raise IndexError(f"{self.url}: record {self._next} requested but the shard has {self._next} records")
            if record.index >= start:
                out.append(record)
        return out

    def count_all(self) -> tuple[int, list[DataIssue]]:
        """Number of records in the shard (reading headers only where possible) and the issues met."""
        issues: list[DataIssue] = []
        while True:
            record = self._read_one(load=False, load_next=False)
            if record is None:
                return self._next, issues
            issues.extend(record.events)
            if self._failure is not None:
                return self._failure.record, issues

    def close(self) -> None:
        for handle in (self._tar, self._file):
            if handle is not None:
                try:
                    handle.close()
                except Exception:  # closing a broken stream must not mask the issue already recorded
                    pass
        self._tar = None
        self._file = None

    def __enter__(self) -> ShardRecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------------

    def _fail(self, category: str, record: int, message: str, key: str | None = None) -> None:
        self._failure = DataIssue(category, self.url, record, key, message)
        self.close()

    def _hole(self) -> RawRecord:
        assert self._failure is not None
        index = self._next
        self._next += 1
        events = (self._failure,) if index == self._failure.record else ()
        return RawRecord(index, None, None, error=self._failure, events=events)

    def _open(self) -> None:
        self._opened = True
        try:
            if self._seekable:
                path = local_path(self.url)
                if os.path.getsize(path) == 0:
                    self._fail("empty_shard", 0, "zero-byte shard file")
                    return
                self._file = _BoundedReads(open(path, "rb"), self.max_record_bytes)
                self._tar = tarfile.open(fileobj=self._file, mode="r:*", encoding=_NAME_ENCODING,
                                         errors=_NAME_ERRORS)
                if self._tar.fileobj is not self._file:  # compressed: bound the reads of the decompressed data
                    self._tar.fileobj = _BoundedReads(self._tar.fileobj, self.max_record_bytes)
            else:
                self._file = _CountingReader(wds.gopen(self.url, "rb"))
                self._tar = tarfile.open(fileobj=self._file, mode="r|*", encoding=_NAME_ENCODING,
                                         errors=_NAME_ERRORS)
                # The stream tarfile built reads the raw stream in small blocks; bound what tarfile asks of it.
                self._tar.fileobj = _BoundedReads(self._tar.fileobj, self.max_record_bytes)
        except tarfile.ReadError as exc:
            text = str(exc)
            if "empty file" in text:
                self._fail("empty_shard", 0, "zero-byte shard (no data in the stream)")
            elif "truncated" in text or "unexpected end" in text:
                self._fail("truncated_shard", 0, f"tar ends inside its first header: {text}")
            else:
                self._fail("unreadable_shard", 0, f"not a readable tar archive: {text}")
        except (OSError, ValueError) as exc:
            self._fail("unreadable_shard", 0, f"cannot open shard: {type(exc).__name__}: {exc}")

    def _next_info(self) -> tarfile.TarInfo | None:
        """Header of the next regular-file member (None at the end of the archive)."""
        assert self._tar is not None
        while True:
            info = self._tar.next()
            if info is None and self._ends_inside_header():
                raise tarfile.ReadError(f"archive ends inside the member header at byte {self._tar.offset}")
            if info is None or info.isfile():
                return info

    def _ends_inside_header(self) -> bool:
        """tarfile reports a header cut short as a normal end of archive; tell the two apart by the byte count."""
        assert self._tar is not None
        if self._seekable:
            if self._tar.fileobj is not self._file:  # compressed: offsets are not file positions
                return False
            size = os.path.getsize(local_path(self.url))
        else:
            if getattr(self._tar.fileobj, "comptype", "tar") != "tar" or not isinstance(self._file, _CountingReader):
                return False
            if not self._file.at_end:
                return False
            size = self._file.total
        return 0 < size - self._tar.offset < tarfile.BLOCKSIZE

    def _next_member(self, load: bool) -> tuple[tarfile.TarInfo, bytes | None] | None:
        """The next regular-file member, with its bytes when ``load`` (streams must read them now or never) and
        it fits :attr:`max_record_bytes` on its own."""
        info = self._next_info()
        if info is None:
            return None
        return info, (self._member_bytes(info) if load and info.size <= self.max_record_bytes else None)

    def _member_bytes(self, info: tarfile.TarInfo) -> bytes:
        assert self._tar is not None
        handle = self._tar.extractfile(info)
        assert handle is not None
        data = handle.read()
        if len(data) != info.size:
            raise tarfile.ReadError(f"member {info.name} has {len(data)} of its {info.size} bytes")
        return data

    def _read_one(self, load: bool, load_next: bool = True) -> RawRecord | None:
        """Record ``self._next``; ``load_next`` says the following record may be wanted (streams load it now)."""
        if self._failure is None and self._deferred is not None and self._deferred[0] == self._next:
            self._fail("truncated_shard", *self._deferred)
        if self._failure is not None:
            return self._hole()
        if not self._opened:
            self._open()
            if self._failure is not None:
                return self._hole()
        index = self._next
        stream = not self._seekable  # a stream must read bytes when it passes them; a file is read lazily
        key: str | None = None
        try:
            first = self._pending
            self._pending = None
            if first is None and not self._eof:
                first = self._next_member(load=stream and load)
            if first is None:
                self._eof = True
                if self.expected is not None and index < self.expected:
                    self._fail(
                        "truncated_shard",
                        index,
                        f"shard ends after {index} records but its manifest lists {self.expected}",
                    )
                    return self._hole()
                return None
            key, ext = split_member_name(first[0].name)
            infos: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {ext: first}
            declared = first[0].size  # the record's bytes so far; a stream loads members only while they fit
            while True:
                # A header that cannot be read is charged to this record: it may have been one of its members.
                info = self._next_info()
                if info is None:
                    self._eof = True
                    break
                other_key, other_ext = split_member_name(info.name)
                if other_key != key or other_ext in infos:
                    try:
                        fits = info.size <= self.max_record_bytes
                        data = self._member_bytes(info) if stream and load_next and fits else None
                    except (tarfile.ReadError, EOFError, OSError) as exc:
                        # The next record's own bytes are cut: this record is whole, the next one fails.
                        self._deferred = (index + 1, f"tar is truncated or corrupt at record {index + 1}: {exc}",
                                          other_key)
                        self._eof = True
                        break
                    self._pending = (info, data)
                    break
                declared += info.size
                fits = declared <= self.max_record_bytes
                infos[other_ext] = (info, self._member_bytes(info) if stream and load and fits else None)
            oversized = declared > self.max_record_bytes
            members: dict[str, bytes] | None = None
            if load and not oversized:
                members = {}
                for member_ext, (info, data) in infos.items():
                    members[member_ext] = data if data is not None else self._member_bytes(info)
        except (tarfile.ReadError, EOFError, OSError) as exc:
            self._fail("truncated_shard", index, f"tar is truncated or corrupt at record {index}: {exc}", key)
            return self._hole()
        assert key is not None
        self._next += 1
        events: list[DataIssue] = []
        error: DataIssue | None = None
        if key in self._keys_seen:
            error = DataIssue("duplicate_key", self.url, index, key, "key already used by an earlier record")
        elif oversized:
            error = DataIssue("oversized_record", self.url, index, key,
                              f"members declare {declared} bytes, above max_record_bytes={self.max_record_bytes}")
        elif image_member({e: b"" for e in infos}) is None:
            error = DataIssue("missing_image", self.url, index, key, f"no image member among {sorted(infos)}")
        self._keys_seen.add(key)
        if error is not None:
            events.append(error)
            members = None
        if self.expected is not None and index == self.expected - 1 and self._pending is not None:
            events.append(
                DataIssue(
                    "extra_records",
                    self.url,
                    index + 1,
                    split_member_name(self._pending[0].name)[0],
                    f"shard holds more records than the {self.expected} its manifest lists; the rest is not read",
                )
            )
        return RawRecord(index, key, members, error=error, events=tuple(events))


class PieceReader:
    """Reads pieces ``(shard, start, stop)`` of a shard list in order, keeping the current shard open across
    consecutive pieces; a piece of another shard, or one before the open reader's position, opens a new reader.

    ``urls`` / ``counts``: the shard list and its manifest record counts (None where unknown); ``open_shard``
    opens shard ``i`` when the shards are not tar files (an image folder's chunks). Use it under
    ``contextlib.closing`` so the open shard is closed however the reading ends.
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int | None],
                 open_shard: Callable[[int], RecordReader] | None = None) -> None:
        self.urls, self.counts = urls, counts
        self._open_shard = open_shard
        self._reader: RecordReader | None = None

    def read(self, shard: int, start: int, stop: int) -> list[RawRecord]:
        """Records ``start .. stop - 1`` of shard ``shard`` (see :meth:`ShardRecordReader.read`)."""
        url = self.urls[shard]
        reader = self._reader
        if reader is None or reader.url != url or reader.position > start:
            self.close()
            reader = self._reader = (self._open_shard(shard) if self._open_shard is not None
                                     else ShardRecordReader(url, self.counts[shard]))
        return reader.read(start, stop)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
