"""Crash-safe files: atomic replacement of whole files, durable creation, and append-only JSONL logs.

Atomic writes go to a hidden temporary sibling ``.<name>.tmp-<pid>`` (never matched by ``*.tar`` or ``*.json``
globs), which is flushed and fsynced, renamed over the target with ``os.replace`` and made durable by an fsync
of the directory. A reader therefore sees the old content or the new one, never a prefix, and after a power
loss the rename is either complete or absent.

A :class:`JsonlLog` is the one append-only log format of the project (``metrics.jsonl``, the sample-key logs,
the fine-tuning log, the launcher events): one JSON object per line, written line-buffered, so a crash loses at
most the line being written. On a resume from step ``S`` the log is cut back with a single rule (see
:meth:`JsonlLog.truncate_after`), so a file never holds a step twice.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

# Write in bounded pieces so a short write from the kernel is retried rather than silently truncating the file.
CHUNK_BYTES = 8 << 20
_TEMP_NAME_RE = re.compile(r"^\..+\.tmp-\d+$")

PathLike = str | os.PathLike[str]


def temp_path(path: PathLike) -> Path:
    """The hidden temporary sibling an atomic write of ``path`` goes through: ``.<name>.tmp-<pid>``."""
    target = Path(path)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """True for a name :func:`temp_path` produces (a leftover when its writer died)."""
    return _TEMP_NAME_RE.match(name) is not None


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so renames and creations inside it survive a power loss.

    Filesystems that cannot fsync a directory (``EINVAL``/``ENOTSUP``) make this a logged no-op.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
        logger.debug("fsync of directory %s not supported (%s); continuing", path, exc)
    finally:
        os.close(fd)


def write_file_durably(
    path: PathLike, data: bytes | memoryview, *, before_chunk: Callable[[int], int] | None = None
) -> None:
    """Create ``path`` (it must not exist), write ``data``, fsync it, close it.

    The caller makes the creation itself durable (an fsync of the directory, or a rename of a folder that is
    fsynced afterwards). ``before_chunk(n)``, when given, is called before each write of up to ``n`` bytes and
    returns how many bytes may be written now (at most ``n``). Raises ``OSError`` (e.g. ``ENOSPC``) unchanged;
    the caller removes the partial file.
    """
    view = memoryview(data).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        offset = 0
        while offset < len(view):
            n = min(CHUNK_BYTES, len(view) - offset)
            if before_chunk is not None:
                n = before_chunk(n)
            written = os.write(fd, view[offset : offset + n])
            if written == 0:  # the kernel reports no progress only on a full device
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            offset += written
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """File handle (``mode`` ``"wb"`` or ``"w"``) whose content replaces ``path`` only if the block finishes.

    The parent directory is created if needed. On an exception the temporary is removed and ``path`` keeps its
    previous content (or stays absent).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_output mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    handle = open(tmp, mode, encoding=None if mode == "wb" else "utf-8")
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(tmp, target)
    except BaseException:
        handle.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Replace ``path``'s content with ``data`` atomically and durably; returns the path."""
    with atomic_output(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Replace ``path``'s content with ``text`` (UTF-8) atomically and durably; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, obj: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``obj`` as JSON (plus a final newline) atomically and durably; returns the path."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def append_jsonl(path: PathLike, record: Mapping[str, Any], *, default: Callable[[Any], Any] | None = None) -> None:
    """Append one record to a JSONL file (created with its parents if needed), for one-off writers."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=default) + "\n")


def read_jsonl(path: PathLike, *, skip_bad: bool = False) -> list[Any]:
    """The records of a JSONL file in order; blank lines are ignored, and with ``skip_bad`` so are lines that
    do not parse (the torn last line of a process that was killed, or of a live writer)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not skip_bad:
                raise
    return records


class JsonlLog:
    """An append-only JSON-lines log: one JSON object per line, line-buffered.

    ``resume_step``: the optimizer step the writer (re)starts from; when given, an existing file is first cut
    back with :meth:`truncate_after`. ``enabled=False`` (e.g. ranks other than 0) makes every method a no-op and
    touches no file. ``default`` converts values ``json`` cannot (as in ``json.dumps``).
    """

    def __init__(self, path: PathLike, *, resume_step: int | None = None, enabled: bool = True,
                 default: Callable[[Any], Any] | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._default = default
        self._file: IO[str] | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        self._open()

    def _open(self) -> None:
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line."""
        if self._file is not None:
            self._file.write(json.dumps(record, default=self._default) + "\n")

    def truncate_after(self, step: int) -> int:
        """Cut the log back to what a run resumed at ``step`` has already written; returns the lines dropped.

        The rule: keep every record before the first one whose ``"step"`` exceeds ``step`` (step records and
        step-less events alike); drop that record and everything after it, and every line that does not parse
        as a JSON object (a line cut short by a crash). The file is rewritten atomically.
        """
        if not self.enabled or not self.path.exists():
            return 0
        was_open = self._file is not None
        self.close()
        kept: list[str] = []
        dropped, past = 0, False
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                dropped += 1
                continue
            record_step = record.get("step")
            if isinstance(record_step, (int, float)) and record_step > step:
                past = True
            if past:
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))
            logger.info("%s: dropped %d line(s) after step %d from an earlier attempt", self.path, dropped, step)
        if was_open:
            self._open()
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
