"""Content identity of the weights an evaluation used (recorded next to every result)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK_BYTES = 8 << 20


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file; for a folder (checkpoint step folder), of its files' names and hashes in order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such weights file or folder")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\t{file_sha256(f)}\n".encode())
    return h.hexdigest()
