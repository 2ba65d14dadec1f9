"""The run directory: resolved config, environment record, the resume-compatibility check and the writer lock.

Layout::

    RUN/.lock              held by rank 0 of the one trainer writing RUN (host, pid, start time, Slurm job id)
    RUN/config.yaml        resolved config (what eval and resume read)
    RUN/environment.json   git SHA, package versions, world size, host
    RUN/metrics.jsonl      one JSON object per logged step, plus events
    RUN/tb/                TensorBoard events
    RUN/checkpoints/       step folders + LATEST (see ssl_vil.checkpoint); each manifest records the config
    RUN/export/            teacher_backbone.safetensors + model.json

Start-up writes nothing until the run is known to start: the output path, device, config compatibility and the
data source are checked, the lock is taken and the checkpoint is loaded first; only then are ``config.yaml`` and
``environment.json`` written. A refused start leaves RUN as it found it (or absent).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_vil.checkpoint import CheckpointVerificationError, LoadedCheckpoint
from ssl_vil.checkpoint.layout import CHECKPOINTS_DIRNAME, MANIFEST_NAME, checkpoints_dir, list_step_dirs
from ssl_vil.checkpoint.manifest import read_manifest
from ssl_vil.config import ConfigError, RunConfig, diff_configs, load_config, to_yaml
from ssl_vil.config.engine import describe_diff
from ssl_vil.config.load import config_from_record, describe_resume_mutable_keys
from ssl_vil.infra.files import fsync_dir, write_json_atomic, write_text_atomic
from ssl_vil.train.checkpointing import CONFIG_METADATA_KEY

if TYPE_CHECKING:
    import torch

PACKAGES = ("torch", "torchvision", "timm", "lightly", "webdataset", "submitit", "numpy", "faiss-cpu", "faiss-gpu",
            "mlstm-kernels")
CONFIG_FILE = "config.yaml"
ENVIRONMENT_FILE = "environment.json"
LOCK_FILE = ".lock"

log = logging.getLogger("ssl_vil.train")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; nothing in it was modified. The message is one line."""


class RunDirLocked(RunDirError):
    """Another trainer holds the run directory's lock; the message names it (pid, host, Slurm job)."""


def git_sha() -> str | None:
    """The project's git commit, or None outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_record(world_size: int) -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"git_sha": git_sha(), "python": sys.version.split()[0], "packages": versions, "world_size": world_size,
            "host": platform.node(), "argv": sys.argv}


def mlstm_backend_record(cfg: RunConfig, device: torch.device | str) -> dict[str, Any]:
    """``{"mlstm_backend": <config value>, "mlstm_backend_resolved": {"global": ..., "local": ...}}``: what the
    ViL's mLSTM runs as for the global and local crops' token counts on ``device`` (``auto`` depends on both and on
    whether mlstm-kernels imports). Empty for a ViT run; no "local" without local crops."""
    from ssl_vil.backbones.mlstm_cell import resolve_backend
    from ssl_vil.export import is_vit_run

    if is_vit_run(cfg):
        return {}
    m, a = cfg.model, cfg.data.augment
    # One mLSTM sequence per traversal = every patch of the crop (stride = patch size), + the middle [CLS] token.
    extra = 1 if cfg.objective.pooling == "middle_cls" else 0
    sizes = {"global": a.global_size, **({"local": a.local_size} if a.n_local > 0 else {})}
    resolved = {crop: resolve_backend(m.mlstm_backend, (size // m.patch_size) ** 2 + extra, device)
                for crop, size in sizes.items()}
    return {"mlstm_backend": m.mlstm_backend, "mlstm_backend_resolved": resolved}


# ------------------------------------------------------------------------------------------ checks (read-only)
def check_output_dir(run_dir: Path) -> None:
    """Raise :class:`RunDirError` unless ``run_dir`` is a writable directory or can be created as one."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        if not run_dir.is_dir():
            raise RunDirError(f"--output-dir {run_dir}: exists and is not a directory")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise RunDirError(f"--output-dir {run_dir}: no permission to write in it")
        return
    ancestor = run_dir.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunDirError(f"--output-dir {run_dir}: cannot be created, {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunDirError(f"--output-dir {run_dir}: cannot be created, no permission to write in {ancestor}")


def _refuse_differences(run_dir: Path, recorded: RunConfig, cfg: RunConfig, source: str) -> None:
    diffs = diff_configs(recorded, cfg)
    if diffs:
        raise ConfigError(f"{run_dir}: existing run has an incompatible config (recorded in {source}); "
                          f"these keys differ: {describe_diff(diffs)}; keys allowed to change on resume: "
                          f"{describe_resume_mutable_keys()}. Use a new --output-dir, or revert these overrides "
                          f"to resume.")


def _record_config(record: Any, source: str) -> RunConfig:
    if not isinstance(record, dict):
        raise ConfigError(f"{source}: the recorded config is not a mapping ({type(record).__name__})")
    try:
        return config_from_record(record)
    except ConfigError as exc:
        raise ConfigError(f"{source}: the recorded config does not fit this version of ssl_vil ({exc})") from None


def _newest_config_record(run_dir: Path) -> tuple[str, Any] | None:
    """``(source, record)`` from the newest step folder whose manifest is intact and records a config."""
    ckpt_dir = checkpoints_dir(run_dir)
    for _, path in sorted(list_step_dirs(ckpt_dir).items(), reverse=True):
        try:
            manifest = read_manifest(path)
        except CheckpointVerificationError:
            continue  # reported when the trainer loads; an older folder still tells the run's config
        if CONFIG_METADATA_KEY in manifest["metadata"]:
            source = f"{CHECKPOINTS_DIRNAME}/{path.name}/{MANIFEST_NAME}"
            return source, manifest["metadata"][CONFIG_METADATA_KEY]
        return None  # written before checkpoints recorded their config
    return None


def check_resume_compatible(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse (``ConfigError`` listing the differing keys) to continue a run whose recorded config differs in keys
    that change what is computed. The record is ``config.yaml``, or, when that is lost, the config stored in the
    newest checkpoint. Read-only."""
    run_dir = Path(run_dir)
    recorded_path = run_dir / CONFIG_FILE
    if recorded_path.exists():
        recorded = load_config(recorded_path, world_size=cfg.derived.world_size)
        _refuse_differences(run_dir, recorded, cfg, CONFIG_FILE)
        return
    found = _newest_config_record(run_dir)
    if found is not None:
        source, record = found
        _refuse_differences(run_dir, _record_config(record, source), cfg, source)


def check_checkpoint_config(run_dir: Path, loaded: LoadedCheckpoint, cfg: RunConfig) -> None:
    """Refuse to load ``loaded`` into a run configured as ``cfg`` if the config it records differs in keys that
    may not change on resume (this decides, not the manifest's config hash)."""
    record = loaded.manifest["metadata"].get(CONFIG_METADATA_KEY)
    source = f"{CHECKPOINTS_DIRNAME}/{Path(loaded.path).name}/{MANIFEST_NAME}"
    if record is None:
        log.warning("checkpoint %s records no config (written by an older version); only %s was compared",
                    loaded.path, CONFIG_FILE)
        return
    _refuse_differences(Path(run_dir), _record_config(record, source), cfg, source)


# ------------------------------------------------------------------------------------------ writes
def write_run_record(run_dir: Path, cfg: RunConfig, device: torch.device | None = None) -> None:
    """Write ``config.yaml`` and ``environment.json`` (rank 0, once the run is known to start); with the training
    ``device``, the environment also records the resolved mLSTM backend (:func:`mlstm_backend_record`)."""
    write_text_atomic(run_dir / CONFIG_FILE, to_yaml(cfg))
    record = environment_record(cfg.derived.world_size)
    if device is not None:
        record.update(mlstm_backend_record(cfg, device))
    write_json_atomic(run_dir / ENVIRONMENT_FILE, record)


def prepare_run_dir(run_dir: Path, cfg: RunConfig, *, is_main: bool) -> None:
    """Check compatibility, then create the run dir and record config + environment (rank 0 only)."""
    check_resume_compatible(run_dir, cfg)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_record(run_dir, cfg)


# ------------------------------------------------------------------------------------------ lock
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (tells a live holder from a reused pid); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start_ticks is None:
        return True
    now = _pid_start_ticks(pid)
    return now is None or now == start_ticks


def _owner_record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start_ticks": _pid_start_ticks(os.getpid()),
        "boot_id": _boot_id(),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
    }


def _describe_holder(holder: dict[str, Any]) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started {holder.get('started_utc')}"


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 1 << 16, 0)
        holder = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_requeue(holder: dict[str, Any] | None, me: dict[str, Any]) -> bool:
    """True when ``holder`` is an earlier attempt of this Slurm job on another host."""
    return (holder is not None and me["slurm_job_id"] is not None and holder.get("host") != me["host"]
            and holder.get("slurm_job_id") == me["slurm_job_id"])


class RunDirLock:
    """``RUN/.lock``: only one trainer (its rank 0) writes a run directory at a time.

    The file is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and holds the owner record
    (host, pid and its start time, boot id, start time, ``SLURM_JOB_ID``); the owner keeps it open with a
    POSIX record lock (``fcntl.lockf``) for the whole run and deletes it on exit. A POSIX lock, not
    ``flock``: it belongs to the process, so data-loader workers forked later do not inherit it and keep it
    alive after the trainer is killed. A lock that exists already is taken over only when its owner is
    provably gone:

    * same host: the record lock is free (the kernel drops it when its process dies, SIGKILL included) and
      the recorded pid is not running any more (checked too, for filesystems without record locks);
    * another host: record locks do not reach across hosts on every filesystem (and on NFS may outlive a
      dead node), so liveness cannot be checked; only a requeue of the same Slurm job (same
      ``SLURM_JOB_ID``: Slurm ended the old attempt first) takes over. Otherwise the start is refused,
      naming the holder, and the user deletes the file if it is stale.

    The owner must not open and close the lock file by another descriptor: closing any descriptor of a file
    drops the process's POSIX locks on it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._record: dict[str, Any] | None = None
        self._created_dirs: list[Path] = []

    def acquire(self) -> None:
        """Create the run dir if needed and take the lock; raises :class:`RunDirLocked` naming the holder."""
        self._make_run_dir()
        me = _owner_record()
        for _ in range(10):  # repeats only while the file is replaced under us by a finishing holder
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                created = False
            try:
                locked = self._try_lock(fd)
                holder = None if created else _read_holder(fd)
                # On NFS a dead node's lock can outlive it; Slurm starts a requeued job only after the old
                # attempt is gone, so the same job on another host may take over even then.
                if not locked and not _is_requeue(holder, me):
                    raise RunDirLocked(self._busy(holder, "is being written by another trainer"))
                if not self._still_linked(fd):
                    os.close(fd)
                    continue
                if not created:
                    self._check_stale(holder, me)
                data = json.dumps(me).encode("utf-8")
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
                if created:
                    fsync_dir(self.run_dir)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self._record = me
            return
        raise RunDirLocked(f"{self.path}: keeps changing while trying to lock it; is another trainer starting?")

    def release(self, *, undo_create: bool = False) -> None:
        """Delete the lock file and drop the lock. ``undo_create``: also remove the run dir (and parents) this
        lock created, if they are empty again (a refused start leaves no trace)."""
        if self._fd is not None:
            try:
                # Delete only the file that still holds our record (never a successor's lock).
                if self._still_linked(self._fd) and _read_holder(self._fd) == self._record:
                    self.path.unlink()
            except OSError as exc:
                log.warning("could not remove the lock file %s (%s)", self.path, exc)
            os.close(self._fd)  # drops the lock after the unlink, so no one locks a file about to vanish
            self._fd, self._record = None, None
        if undo_create:
            for path in reversed(self._created_dirs):
                try:
                    path.rmdir()
                except OSError:
                    break
        self._created_dirs = []

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _make_run_dir(self) -> None:
        missing = []
        path = self.run_dir.absolute()
        while not path.exists():
            missing.append(path)
            path = path.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise RunDirError(f"--output-dir {self.run_dir}: cannot create {path} ({exc.strerror})") from None
            self._created_dirs.append(path)

    @staticmethod
    def _try_lock(fd: int) -> bool:
        """False when another process holds the record lock; True when taken or unsupported."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            log.debug("record locks not supported here (%s); relying on the owner record", exc)
        return True

    def _still_linked(self, fd: int) -> bool:
        """True when ``self.path`` is still the file behind ``fd`` (a finishing holder may have deleted it)."""
        try:
            a, b = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _check_stale(self, holder: dict[str, Any] | None, me: dict[str, Any]) -> None:
        """Return when ``holder`` is gone (its lock may be taken over); raise :class:`RunDirLocked` otherwise."""
        if holder is None:
            log.warning("%s holds no readable owner record; taking it over", self.path)
            return
        if holder.get("host") == me["host"]:
            same_boot = holder.get("boot_id") == me["boot_id"]
            pid = holder.get("pid")
            if same_boot and isinstance(pid, int) and pid != me["pid"] and _pid_alive(pid, holder.get(
                    "pid_start_ticks")):
                raise RunDirLocked(self._busy(holder, "is being written by another trainer"))
            log.warning("taking over the stale lock %s of %s (no longer running)", self.path, _describe_holder(holder))
            return
        if _is_requeue(holder, me):
            log.info("taking over the lock %s of an earlier attempt of Slurm job %s (on host %s)", self.path,
                     me["slurm_job_id"], holder.get("host"))
            return
        raise RunDirLocked(self._busy(holder, "is locked by a trainer on another host")
                           + f"; if that run is no longer running (e.g. its node died), delete {self.path}")

    def _busy(self, holder: dict[str, Any] | None, what: str) -> str:
        who = _describe_holder(holder) if holder else "an unknown process (its owner record is not readable yet)"
        return f"{self.run_dir} {what}: {who} (lock file {self.path}); refusing to start a second writer"
