"""Atomic, hashed, retained training checkpoints.

On-disk layout of a run directory::

    run_dir/checkpoints/
        LATEST                        "step_00000020\\n": folder of the last completed save (written last)
        step_00000010/                a complete checkpoint (kept: multiple of keep_every_steps)
        step_00000015/
        step_00000020/
            manifest.json             step, config_hash, git_sha, world_size, format_version, created_utc,
                                      metadata, {file: sha256, size_bytes}, manifest_sha256
            student.pt  teacher.pt  optimizer.pt  ...   one torch.save file per payload entry
        .tmp-step_00000025-<pid>/     a save in progress (or killed); removed by the next save

A save writes into the ``.tmp-`` folder, fsyncs every file and the manifest, reads it back against the
manifest, renames it to ``step_XXXXXXXX`` and fsyncs ``checkpoints/``, then replaces ``LATEST`` (temp file +
``os.replace`` + directory fsync), then applies retention (the ``keep_last`` newest valid folders plus every
multiple of ``keep_every_steps``). Loading picks the newest step folder whose files match its manifest and
unpickle (``LATEST`` is a hint: a folder renamed into place just before a crash is complete and is used), and
falls back to older ones otherwise; an empty step folder is skipped with a warning (it cannot hold a save).
Files are read with ``torch.load(weights_only=True)``, so a payload holds only tensors and plain python
values; RNG states go through :func:`capture_rng_state`.
"""

from ssl_vil.checkpoint.errors import (
    CheckpointError,
    CheckpointLoadError,
    CheckpointVerificationError,
    CheckpointWriteError,
)
from ssl_vil.checkpoint.fingerprint import config_hash
from ssl_vil.checkpoint.manager import CheckpointManager, LoadedCheckpoint, latest_checkpoint, load_latest_checkpoint
from ssl_vil.checkpoint.manifest import FORMAT_VERSION, verify_step_dir
from ssl_vil.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointLoadError",
    "CheckpointManager",
    "CheckpointVerificationError",
    "CheckpointWriteError",
    "LoadedCheckpoint",
    "capture_rng_state",
    "config_hash",
    "latest_checkpoint",
    "load_latest_checkpoint",
    "restore_rng_state",
    "verify_step_dir",
]
