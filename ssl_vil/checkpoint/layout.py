"""Names on disk: where step folders, temp folders and the ``LATEST`` pointer live inside a run directory."""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINTS_DIRNAME = "checkpoints"
LATEST_NAME = "LATEST"
MANIFEST_NAME = "manifest.json"
PAYLOAD_SUFFIX = ".pt"
# Everything that starts with this prefix is scratch from an unfinished save or purge; any save removes it.
TEMP_PREFIX = ".tmp-"

_STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
# Entry names become file names; restricting them keeps a manifest from pointing outside its folder.
ENTRY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIRNAME


def step_dir_name(step: int) -> str:
    """``step_00000020``; zero-padded so a plain directory listing sorts by step."""
    return f"step_{step:08d}"


def parse_step_dir_name(name: str) -> int | None:
    """Step of a final step-folder name, or None for anything else (temp folders, LATEST, stray files)."""
    match = _STEP_DIR_RE.match(name)
    return int(match.group(1)) if match else None


def list_step_dirs(ckpt_dir: Path) -> dict[int, Path]:
    """``{step: folder}`` for every final step folder under ``ckpt_dir`` (verified or not)."""
    if not ckpt_dir.is_dir():
        return {}
    found: dict[int, Path] = {}
    for entry in ckpt_dir.iterdir():
        step = parse_step_dir_name(entry.name)
        if step is not None and entry.is_dir():
            found[step] = entry
    return found


def read_latest_pointer(ckpt_dir: Path) -> str | None:
    """Folder name stored in ``LATEST`` (stripped), or None when there is no readable pointer."""
    try:
        return (ckpt_dir / LATEST_NAME).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None
