"""Crash-safe file primitives: write-and-fsync, directory fsync, atomic small-file replace.

A rename is durable only once the directory holding it is fsynced, and a file's bytes only once the file
is fsynced; a checkpoint folder gets its final name after both, so a folder with a final name is complete.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

# Write in bounded pieces so progress callbacks (fault injection) see byte-accurate positions and a
# short write from the kernel is retried rather than silently truncating the file.
CHUNK_BYTES = 8 << 20


def write_file_durably(
    path: Path, data: bytes | memoryview, *, before_chunk: Callable[[int], int] | None = None
) -> None:
    """Create ``path`` (must not exist), write ``data``, fsync it, close it.

    ``before_chunk(n)`` is called before each write of up to ``n`` bytes and returns how many bytes may be
    written now (at most ``n``); it lets fault injection stop at an exact byte. Raises ``OSError``
    (e.g. ``ENOSPC``) unchanged; the caller removes the partial file's folder.
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


def fsync_dir(path: Path) -> None:
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


def replace_file_durably(path: Path, text: str) -> None:
    """Atomically set ``path``'s content to ``text``: write a temp sibling, fsync, ``os.replace``, fsync dir.

    Readers see either the old or the new content, never a mix or an empty file.
    """
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        write_file_durably(tmp, text.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
