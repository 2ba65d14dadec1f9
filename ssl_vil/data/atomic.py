"""Atomic file creation: write to a hidden temporary in the target directory, fsync, then rename.

A reader (or a crashed writer's rerun) therefore sees either no file or the complete file, never a prefix.
Temporaries are named ``.<name>.tmp-<pid>`` so shard globs (``*.tar``) never pick them up.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Binary file handle whose content appears at ``path`` only if the ``with`` block finishes."""
    target = Path(path)
    tmp = temp_name(target)
    handle = open(tmp, "wb")
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        handle.close()
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_output(path) as handle:
        handle.write(data)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete ``.*.tmp-<pid>`` files left by writers that died; returns what was removed."""
    removed = []
    for path in directory.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
