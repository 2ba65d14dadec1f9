"""``CheckpointManager`` (atomic, hashed, retained step folders) and ``latest_checkpoint(run_dir)``.

Resume rule: **the newest step folder that passes verification wins; ``LATEST`` is a hint.** A folder gets
its final ``step_XXXXXXXX`` name only after every file and the manifest are fsynced, so a final-named folder
is a finished save even when the process died between that rename and the rewrite of ``LATEST``. Hashes
catch what the rename protocol cannot (bit rot, truncation, edits); a folder that fails, or whose verified
files still cannot be unpickled, is logged, counted in ``fallbacks`` and skipped for the next older one. An
empty step folder (no manifest, no payload: never produced by a save) is skipped with a warning and removed
by :meth:`CheckpointManager.remove_empty_step_dirs` once the run is known to start.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ssl_vil.checkpoint.errors import CheckpointLoadError, CheckpointVerificationError, CheckpointWriteError
from ssl_vil.checkpoint.layout import (
    ENTRY_NAME_RE,
    LATEST_NAME,
    MANIFEST_NAME,
    PAYLOAD_SUFFIX,
    TEMP_PREFIX,
    checkpoints_dir,
    list_step_dirs,
    read_latest_pointer,
    step_dir_name,
)
from ssl_vil.checkpoint.manifest import (
    build_manifest,
    encode_manifest,
    read_manifest,
    read_verified_file,
    verify_step_dir,
)
from ssl_vil.checkpoint.payload import check_weights_only_safe, describe_load_failure, deserialize, serialize
from ssl_vil.checkpoint.retention import plan_retention
from ssl_vil.infra.files import fsync_dir, is_temp_name, write_file_durably, write_text_atomic

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "the disk (or the user's quota) is full"; both are routine on shared cluster storage.
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A verified checkpoint read back: ``payload`` maps each saved entry name to its loaded object."""

    step: int
    path: Path
    payload: dict[str, Any]
    manifest: dict[str, Any]


def _folder_signature(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """Cheap identity of a folder's contents (name, size, mtime, inode per file) for the verification cache."""
    rows = []
    with os.scandir(path) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            rows.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(rows))


def _is_empty_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False  # unreadable: let verification report it


def empty_step_dirs(ckpt_dir: Path) -> list[Path]:
    """Final-named step folders holding nothing at all (no manifest, no payload), oldest first.

    A save renames a complete folder into place, so an empty one was made by something else (an interrupted
    copy, a manual ``mkdir``) and can never be a checkpoint.
    """
    return [path for _, path in sorted(list_step_dirs(ckpt_dir).items()) if _is_empty_dir(path)]


def _latest_note(ckpt_dir: Path, pointer: str | None) -> str:
    """What ``LATEST`` says, for the log line when it does not name the folder that was picked."""
    if pointer is not None:
        return f"{LATEST_NAME} names {pointer[:80]!r}"
    if not (ckpt_dir / LATEST_NAME).exists():
        return f"{ckpt_dir / LATEST_NAME} is missing"
    return f"{ckpt_dir / LATEST_NAME} does not name a step folder (empty or not text)"


def _newest_verified(
    ckpt_dir: Path, attempt: Callable[[Path], T], on_failure: Callable[[], None] | None = None
) -> tuple[Path, T] | None:
    """Run ``attempt`` on step folders newest-first; return the first that raises no verification or
    load error.

    None when there is no non-empty step folder; :class:`CheckpointVerificationError` naming every folder's
    problem, on one line, when folders exist but none is usable (silently restarting from scratch would be
    worse).
    """
    dirs = list_step_dirs(ckpt_dir)
    empty = {path for path in dirs.values() if _is_empty_dir(path)}
    for path in sorted(empty):
        logger.warning("checkpoint folder %s is empty (no manifest, no payload); skipping it", path)
    dirs = {step: path for step, path in dirs.items() if path not in empty}
    if not dirs:
        return None
    pointer = read_latest_pointer(ckpt_dir)
    failures: list[str] = []
    for step in sorted(dirs, reverse=True):
        path = dirs[step]
        try:
            value = attempt(path)
        except (CheckpointVerificationError, CheckpointLoadError) as exc:
            what = "cannot be loaded" if isinstance(exc, CheckpointLoadError) else "failed verification"
            logger.error("checkpoint %s %s, trying the previous one: %s", path.name, what, exc)
            failures.append(" ".join(str(exc).split()))
            if on_failure is not None:
                on_failure()
            continue
        if pointer != path.name:
            # Expected after a kill between the step folder's rename and the LATEST update, or after
            # falling back from a corrupt LATEST target; worth a line in the log either way.
            logger.warning("%s; using %s, the newest verified step folder", _latest_note(ckpt_dir, pointer), path.name)
        return path, value
    raise CheckpointVerificationError(f"no checkpoint under {ckpt_dir} passes verification: " + "; ".join(failures))


def load_latest_checkpoint(run_dir: Path | str) -> LoadedCheckpoint | None:
    """The newest *usable* checkpoint of ``run_dir``, loaded; None when the run has no checkpoint yet.

    The one rule that decides where a run resumes (the trainer's :meth:`CheckpointManager.load_latest` and the
    Slurm launcher's resume point both follow it): temp folders and empty step folders are ignored; a newest folder
    that fails verification, or whose verified files cannot be unpickled, is logged and skipped. Raises
    :class:`CheckpointVerificationError` if step folders exist but none is usable. Read-only, safe to call while
    nothing is writing.
    """
    found = _newest_verified(checkpoints_dir(Path(run_dir)), CheckpointManager.load_folder)
    return None if found is None else found[1]


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The folder of :func:`load_latest_checkpoint` (which it reads and loads to decide), or None."""
    loaded = load_latest_checkpoint(run_dir)
    return None if loaded is None else loaded.path


class CheckpointManager:
    """Writes and reads ``run_dir/checkpoints/step_XXXXXXXX/`` folders (layout: see ``ssl_vil.checkpoint``).

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        keep_last: number of newest valid checkpoints kept (>= 1; configs should ask for >= 2).
        keep_every_steps: steps that are multiples of this are never deleted; None keeps none extra.
        config_hash: :func:`ssl_vil.checkpoint.config_hash` of the resolved config, stored in manifests.
        world_size: number of ranks of the run, stored in manifests.
        git_sha: commit of the code, stored in manifests (None when unknown).
        rank: this process's rank; only rank 0 touches the disk in :meth:`save`.
        barrier: collective called by every rank at the end of :meth:`save`, so no rank runs ahead of a
            write in progress; None for single-process runs.

    Only one process (rank 0 of one job) may write to a run directory at a time: a save removes every
    ``.tmp-*`` entry it finds, taking them for leftovers of a crashed save. The trainer guarantees this with
    the run dir's lock (``ssl_vil.train.run_dir.RunDirLock``).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        keep_last: int,
        keep_every_steps: int | None,
        config_hash: str,
        world_size: int,
        git_sha: str | None,
        rank: int = 0,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        if type(keep_last) is not int or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        if keep_every_steps is not None and (type(keep_every_steps) is not int or keep_every_steps < 1):
            raise ValueError(f"keep_every_steps must be None or an int >= 1, got {keep_every_steps!r}")
        if not isinstance(config_hash, str) or not config_hash:
            raise ValueError(f"config_hash must be a non-empty str, got {config_hash!r}")
        if type(world_size) is not int or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if type(rank) is not int or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = checkpoints_dir(self.run_dir)
        self.keep_last = keep_last
        self.keep_every_steps = keep_every_steps
        self.config_hash = config_hash
        self.world_size = world_size
        self.git_sha = git_sha
        self.rank = rank
        self._barrier = barrier
        self.fallbacks = 0  # checkpoints skipped by load_latest because they failed verification
        # Folders already verified by this process, keyed by name, valued by their _folder_signature, so
        # retention re-hashes a folder only when its files changed.
        self._verified: dict[str, tuple[tuple[str, int, int, int], ...]] = {}

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, payload: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``payload`` as checkpoint ``step`` and return its folder.

        Each entry ``name -> obj`` becomes ``<name>.pt`` (``torch.save``). ``obj`` must survive
        ``torch.load(weights_only=True)`` (see ``ssl_vil.checkpoint.payload``); this is checked before any
        byte is written. ``metadata`` (JSON-able) is stored in the manifest. Ranks other than 0 write
        nothing and return after the barrier; rank 0 reaches the barrier even when its save fails, so the
        others are not left waiting. Raises :class:`CheckpointWriteError` (``"no space"`` in the message on
        a full disk or quota) after removing the partial save; the previous checkpoint is untouched.
        """
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        final = self.checkpoint_dir / step_dir_name(step)
        try:
            if self.rank == 0:
                self._save_on_rank0(step, payload, dict(metadata or {}), final)
        finally:
            if self._barrier is not None:
                self._barrier()
        return final

    def _save_on_rank0(self, step: int, payload: Mapping[str, Any], metadata: dict[str, Any], final: Path) -> None:
        entries = self._checked_entries(payload)
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"checkpoint metadata must be plain JSON data: {exc}") from exc
        started = time.perf_counter()

        if not self.checkpoint_dir.is_dir():
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.checkpoint_dir.parent)  # else a power loss can drop the new folder itself
        self._remove_orphans()
        tmp = self.checkpoint_dir / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
        try:
            tmp.mkdir()
            files = self._write_payload(tmp, entries)
            manifest = build_manifest(
                step=step, config_hash=self.config_hash, git_sha=self.git_sha, world_size=self.world_size,
                files=files, metadata=metadata,
            )  # fmt: skip
            write_file_durably(tmp / MANIFEST_NAME, encode_manifest(manifest))
            fsync_dir(tmp)
            # Read back before the folder may replace anything: retention deletes the previous newest
            # checkpoint only after this one is known good.
            verify_step_dir(tmp)
            self._move_into_place(tmp, final)
        except BaseException as exc:
            self._discard(tmp)
            if isinstance(exc, OSError):
                raise self._write_error(step, exc) from exc
            if isinstance(exc, CheckpointVerificationError):
                raise CheckpointWriteError(f"checkpoint step {step} reads back wrong, not kept: {exc}") from exc
            raise
        self._verified[final.name] = _folder_signature(final)

        try:
            write_text_atomic(self.checkpoint_dir / LATEST_NAME, final.name + "\n")
        except OSError as exc:
            raise self._write_error(step, exc) from exc
        self._apply_retention(step)
        size_bytes = sum(size for _, size in files.values())
        logger.info(
            "saved checkpoint step %d to %s (%d files, %.1f MB, %.2f s)",
            step, final, len(files), size_bytes / 1e6, time.perf_counter() - started,
        )  # fmt: skip

    @staticmethod
    def _checked_entries(payload: Mapping[str, Any]) -> list[tuple[str, Any]]:
        if not isinstance(payload, Mapping) or not payload:
            raise ValueError(f"checkpoint payload must be a non-empty mapping of name -> state, got {payload!r:.80}")
        for name, obj in payload.items():
            if not isinstance(name, str) or not ENTRY_NAME_RE.match(name):
                raise ValueError(
                    f"checkpoint payload name {name!r} is not a valid file stem (letters, digits, '_', '.', '-')"
                )
            check_weights_only_safe(obj, f"payload[{name!r}]")
        return list(payload.items())

    def _write_payload(self, tmp: Path, entries: list[tuple[str, Any]]) -> dict[str, tuple[str, int]]:
        """Serialize and durably write each entry; returns ``{file_name: (sha256, size_bytes)}``."""
        files: dict[str, tuple[str, int]] = {}
        for name, obj in entries:
            data = serialize(obj)  # one entry in memory at a time
            file_name = name + PAYLOAD_SUFFIX
            write_file_durably(tmp / file_name, data)
            files[file_name] = (hashlib.sha256(data).hexdigest(), len(data))
        return files

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        """Rename the finished temp folder to its final name (durably), replacing an existing one."""
        self._verified.pop(final.name, None)
        stale = None
        if final.exists():
            # rename() cannot replace a non-empty directory; move the old one aside under a temp name
            # first, so a crash in between leaves only scratch that the next save sweeps away.
            stale = self.checkpoint_dir / f"{TEMP_PREFIX}replaced-{final.name}-{os.getpid()}"
            logger.warning("checkpoint %s already exists; replacing it", final)
            os.rename(final, stale)
        os.rename(tmp, final)
        fsync_dir(self.checkpoint_dir)
        if stale is not None:
            self._discard(stale)

    def _write_error(self, step: int, exc: OSError) -> CheckpointWriteError:
        previous = read_latest_pointer(self.checkpoint_dir)
        kept = f"previous checkpoint {previous} is intact" if previous else "there is no previous checkpoint"
        if exc.errno in _NO_SPACE_ERRNOS:
            return CheckpointWriteError(
                f"no space left for checkpoint step {step} in {self.checkpoint_dir} ({exc}); "
                f"the partial save was removed and {kept}"
            )
        return CheckpointWriteError(
            f"writing checkpoint step {step} in {self.checkpoint_dir} failed ({exc}); "
            f"the partial save was removed and {kept}"
        )

    # ------------------------------------------------------------------------------ housekeeping
    def _discard(self, path: Path) -> None:
        """Best-effort removal of scratch; a failure is logged, the next save's orphan sweep retries."""
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove %s (%s); the next save retries", path, exc)

    def _remove_orphans(self) -> None:
        """Remove ``.tmp-*`` leftovers of saves or purges, and atomic-write temporaries, of writers that were killed
        (or failed to clean up)."""
        for entry in self.checkpoint_dir.iterdir():
            if entry.name.startswith(TEMP_PREFIX) or is_temp_name(entry.name):
                logger.info("removing %s left by an interrupted save", entry)
                self._discard(entry)

    def _is_valid(self, path: Path) -> bool:
        try:
            signature = _folder_signature(path)
        except OSError:
            return False
        if self._verified.get(path.name) == signature:
            return True
        try:
            verify_step_dir(path)
        except CheckpointVerificationError as exc:
            logger.warning("retention: %s", exc)
            return False
        self._verified[path.name] = signature
        return True

    def _apply_retention(self, current_step: int) -> None:
        """Delete what :func:`plan_retention` dooms; failures are logged and never fail the save."""
        try:
            dirs = list_step_dirs(self.checkpoint_dir)
            doomed = plan_retention(
                dirs, current_step=current_step, keep_last=self.keep_last,
                keep_every_steps=self.keep_every_steps, is_valid=lambda s: self._is_valid(dirs[s]),
            )  # fmt: skip
        except OSError as exc:
            logger.warning("retention skipped: cannot list %s (%s)", self.checkpoint_dir, exc)
            return
        for step, reason in sorted(doomed.items()):
            path = dirs[step]
            # Rename first so a half-deleted folder never carries a final name the loader would try.
            trash = self.checkpoint_dir / f"{TEMP_PREFIX}purge-{path.name}-{os.getpid()}"
            logger.info("removing checkpoint %s: %s", path.name, reason)
            try:
                os.rename(path, trash)
            except OSError as exc:
                logger.warning("could not remove checkpoint %s (%s); the next save retries", path, exc)
                continue
            self._verified.pop(path.name, None)
            self._discard(trash)

    # ------------------------------------------------------------------------------------------ load
    def load_latest(self, map_location: str | torch.device = "cpu") -> LoadedCheckpoint | None:
        """Load the newest verified checkpoint (the folder :func:`latest_checkpoint` names), or None.

        Every file is read once: hashed, compared with the manifest, then ``torch.load``-ed from memory with
        ``weights_only=True``. A folder that fails verification (logged with the file and the expected and
        actual sha256) or whose verified files cannot be unpickled increments :attr:`fallbacks`, and the next
        older folder is tried. Raises :class:`CheckpointVerificationError` naming every folder's problem when
        folders exist but none is usable.
        """

        def count_fallback() -> None:
            self.fallbacks += 1

        found = _newest_verified(
            self.checkpoint_dir, lambda path: self.load_folder(path, map_location), on_failure=count_fallback
        )
        if found is None:
            return None
        loaded = found[1]
        if loaded.manifest["config_hash"] != self.config_hash:
            # Informational only: keys that may change on resume (workers, paths, cadence) change the hash
            # too; whether the config is compatible is the caller's decision (the trainer compares keys).
            logger.info(
                "checkpoint %s was written with config_hash %s, this run has %s",
                loaded.path.name, loaded.manifest["config_hash"], self.config_hash,
            )  # fmt: skip
        return loaded

    def remove_empty_step_dirs(self) -> list[Path]:
        """Remove empty step folders (see :func:`empty_step_dirs`) on rank 0; returns what was removed.

        ``os.rmdir`` refuses a folder that is not empty, so a file that appears meanwhile is never deleted.
        """
        removed: list[Path] = []
        if self.rank != 0:
            return removed
        for path in empty_step_dirs(self.checkpoint_dir):
            try:
                os.rmdir(path)
            except OSError as exc:
                logger.warning("could not remove the empty checkpoint folder %s (%s)", path, exc)
                continue
            logger.warning("removed the empty checkpoint folder %s (no manifest, no payload)", path)
            removed.append(path)
        if removed:
            fsync_dir(self.checkpoint_dir)
        return removed

    @staticmethod
    def load_folder(path: Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
        """Verify and load one given step folder (export of a chosen step, inspection); no fallback.

        Raises :class:`CheckpointVerificationError` naming the file and both sha256 when it does not
        match its manifest, :class:`CheckpointLoadError` when a verified file cannot be unpickled.
        """
        path = Path(path)
        manifest = read_manifest(path)
        payload: dict[str, Any] = {}
        for file_name, entry in manifest["files"].items():
            data = read_verified_file(path, file_name, entry)
            try:
                payload[file_name[: -len(PAYLOAD_SUFFIX)]] = deserialize(data, map_location)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure gets the file named
                raise CheckpointLoadError(
                    f"{path / file_name} matches its manifest but torch.load(weights_only=True) fails: "
                    f"{describe_load_failure(exc)}"
                ) from exc
        return LoadedCheckpoint(step=manifest["step"], path=path, payload=payload, manifest=manifest)
