"""The callable a submitit job runs in every task, and how it requeues itself after a preemption.

Sequence inside one task (``python -m submitit.core._submit RUN/slurm/%j``):

1. submitit installs its handlers (USR2 -> ``SignalHandler.checkpoint_and_try_requeue``, TERM/CONT -> log only)
   and calls :meth:`EntryJob.__call__`.
2. ``__call__`` exports the torch.distributed variables (:mod:`cluster.dist_env`) and calls the entry's
   ``main(argv)`` (``ssl_vil.train.cli.main`` or ``eval/<name>.py:main``).
3. The trainer replaces the USR2/TERM handlers with a flag while it trains. On a signal (preemption, or Slurm's
   ``--signal=USR2@N`` warning before the time limit) all ranks stop at the same step boundary, save that step,
   restore submitit's handlers and return ``REQUEUE_EXIT_CODE``.
4. On that code, rank 0 calls submitit's own ``checkpoint_and_try_requeue`` -- the handler it would have run on the
   signal -- so the requeue follows submitit's rules exactly: timeout vs. preemption by wall time, the
   ``max_num_timeout`` countdown, :meth:`EntryJob.checkpoint` re-pickled as the job's next submission,
   ``scontrol requeue <job id>`` (same job id, ``SLURM_RESTART_COUNT`` + 1), exit. The other ranks wait for rank 0's
   decision (it rewrites the job's submission pickle when it requeues) and exit without a result file.
5. The requeued job runs ``main(argv)`` again with the same run directory; the trainer resumes from
   ``ssl_vil.checkpoint.latest_checkpoint(run_dir)``, the step it saved, so no step is lost.

A signal that arrives while no trainer handler is installed (start-up, shutdown, an eval entry) goes to submitit's
handler directly, which requeues through the same :meth:`EntryJob.checkpoint`.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import submitit
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, JobPaths, UncompletedJobError
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from cluster.dist_env import DistributedEnv, export_distributed_env, restart_count

ENTRY_TRAIN = "train"
# Every entry is an importable module with ``main(argv: list[str])``; the eval/*.py scripts call the same ones.
ENTRY_MODULES = {ENTRY_TRAIN: "ssl_vil.train.cli", "knn": "ssl_vil.eval.knn",
                 "linear": "ssl_vil.eval.linear", "finetune": "ssl_vil.eval.finetune",
                 "segment": "ssl_vil.eval.segment"}
ENTRIES = tuple(ENTRY_MODULES)
EVENTS_FILENAME = "launcher_events.jsonl"
# How long ranks > 0 wait for rank 0 to requeue the job (it only pickles the next submission and runs
# `scontrol requeue`, which takes seconds) before they give up with an error.
RANK0_DECISION_TIMEOUT_S = 300.0
_POLL_S = 0.2

EntryMain = Callable[[list[str]], Any]


def load_entry(entry: str, repo_root: Path) -> tuple[EntryMain, int | None]:
    """``(main, requeue_exit_code)`` of an entry; the code is None for entries that do not save on a signal.

    ``repo_root`` is put first on ``sys.path`` so the job runs the code of the checkout it was submitted from."""
    if entry not in ENTRY_MODULES:
        raise ValueError(f"--entry: got {entry!r}, expected one of {', '.join(ENTRIES)}")
    if str(repo_root) not in sys.path:
        sys.path.insert(0, str(repo_root))
    module = importlib.import_module(ENTRY_MODULES[entry])
    return module.main, getattr(module, "REQUEUE_EXIT_CODE", None)


def checkpoint_step(path: Path) -> int:
    """Training step of a checkpoint folder returned by ``latest_checkpoint`` (``.../step_00000020`` -> 20)."""
    from ssl_vil.checkpoint.layout import parse_step_dir_name

    step = parse_step_dir_name(Path(path).name)
    if step is None:
        raise ValueError(f"{path}: not a checkpoint step folder (expected a name like step_00000020)")
    return step


def resume_point(run_dir: Path) -> tuple[str | None, int | None]:
    """``(checkpoint folder, step)`` a training run in ``run_dir`` resumes from; ``(None, None)`` before the first
    save. Uses the trainer's own ``latest_checkpoint``, so it is by construction the point the trainer picks."""
    from ssl_vil.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        return None, None
    return str(ckpt), checkpoint_step(ckpt)


def _is_submitit_requeue_handler(handler: Any) -> bool:
    return isinstance(getattr(handler, "__self__", None), SignalHandler) and \
        getattr(handler, "__func__", None) is SignalHandler.checkpoint_and_try_requeue


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


class EntryJob(submitit.helpers.Checkpointable):
    """Runs ``<entry>.main(argv)`` in each task of a submitit job; requeues itself on preemption or time limit.

    The object is pickled at submission and again by :meth:`checkpoint` at each requeue, so it holds only the
    launch spec and the resume point it recorded, never model state: the trainer owns its checkpoints.
    """

    def __init__(self, entry: str, argv: list[str], run_dir: Path | str, repo_root: Path | str,
                 jobs_root: Path | str) -> None:
        if entry not in ENTRIES:
            raise ValueError(f"--entry: got {entry!r}, expected one of {', '.join(ENTRIES)}")
        self.entry = entry
        self.argv = list(argv)
        self.run_dir = str(run_dir)
        self.repo_root = str(repo_root)
        self.jobs_root = str(jobs_root)
        # Filled by checkpoint(): how many times this job was requeued, and where the trainer will resume.
        self.requeues = 0
        self.resume_checkpoint: str | None = None
        self.resume_step: int | None = None

    # ---------------------------------------------------------------------------------------------- in the job
    def __call__(self) -> dict[str, Any]:
        job_env = submitit.JobEnvironment()
        usr_sig = job_env._usr_sig()
        # submitit installed this before calling us; the trainer swaps it out while training and puts it back.
        requeue_handler = signal.getsignal(usr_sig)
        paths = job_env.paths
        # Rank 0 rewrites the submission pickle when it requeues the job: the other ranks watch for that.
        pickle_mtime = _mtime_ns(paths.submitted_pickle)
        rank0_result = JobPaths(paths.folder, job_id=job_env.job_id, task_id=0).result_pickle
        rank0_result_mtime = _mtime_ns(rank0_result)

        dist = export_distributed_env()
        if dist.rank == 0:
            ckpt, step = self._resume_point_or_error()
            self._record("start", job_env, dist, checkpoint_at_start=ckpt, step_at_start=step)
        print(f"[ssl_vil launcher] {self.entry} job {job_env.job_id} restart {restart_count()} rank {dist.rank}/"
              f"{dist.world_size} (node {dist.node_rank}/{dist.num_nodes}, local {dist.local_rank}) master "
              f"{dist.master_addr}:{dist.master_port}; recorded resume step {self.resume_step}", flush=True)

        main, requeue_code = load_entry(self.entry, Path(self.repo_root))
        try:
            result = main(self.argv)
        except SystemExit as exc:  # argparse and friends: turn into a code so the job records a result
            result = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:
            if dist.rank == 0:
                self._record("failed", job_env, dist, error=repr(exc))
            raise
        code = result if isinstance(result, int) and not isinstance(result, bool) else 0

        if code == 0:
            # The work is done: a late preemption / time-limit warning must not requeue it, nor kill the process
            # while it exits (Python resets handlers it installed to the default action, "terminate", during
            # interpreter shutdown, and Slurm would then mark a completed job FAILED). SIG_IGN survives shutdown.
            signal.signal(usr_sig, signal.SIG_IGN)
            if dist.rank == 0:
                self._record("finished", job_env, dist, exit_code=0)
            return {"entry": self.entry, "rank": dist.rank, "world_size": dist.world_size, "exit_code": 0,
                    "job_id": job_env.job_id, "restart_count": restart_count(), "requeues": self.requeues,
                    "result": None if isinstance(result, int) else result}
        if requeue_code is not None and code == requeue_code:
            if dist.rank == 0:
                self._requeue_from_rank0(requeue_handler, usr_sig)
            self._follow_rank0(job_env, paths.submitted_pickle, pickle_mtime, rank0_result, rank0_result_mtime)
        if dist.rank == 0:
            self._record("failed", job_env, dist, exit_code=code)
        raise RuntimeError(f"{self.entry} exited with code {code} on rank {dist.rank} (job {job_env.job_id}); "
                           f"see {paths.stderr} and {paths.stdout}")

    def _requeue_from_rank0(self, handler: Any, usr_sig: int) -> None:
        """Run submitit's requeue decision as if the signal had just arrived; it exits or raises."""
        if not _is_submitit_requeue_handler(handler):
            raise RuntimeError(f"{self.entry} saved for a requeue, but submitit's {signal.Signals(usr_sig).name} "
                               f"handler is not installed in this process (found {handler!r}); resubmit the same "
                               f"command to resume from {self.run_dir}")
        try:
            handler(usr_sig, None)  # -> checkpoint() + `scontrol requeue` + sys.exit, or UncompletedJobError
        except UncompletedJobError as exc:  # e.g. "timed-out too many times"
            self._record("not_requeued", submitit.JobEnvironment(), None, reason=str(exc))
            raise
        raise RuntimeError("submitit's checkpoint_and_try_requeue returned without requeueing or raising")

    def _follow_rank0(self, job_env: submitit.JobEnvironment, submitted: Path, pickle_mtime: int | None,
                      rank0_result: Path, rank0_result_mtime: int | None) -> None:
        """Ranks > 0 after a save-for-requeue: exit once rank 0 has requeued the job, raise if it gave up.

        These ranks must not return (that would write a result file for a job that is not done), and under
        ``srun --kill-on-bad-exit`` they must exit with 0 so they do not kill rank 0 in the middle of its requeue.
        """
        deadline = time.monotonic() + RANK0_DECISION_TIMEOUT_S
        while time.monotonic() < deadline:
            if _mtime_ns(submitted) != pickle_mtime:
                # The local executor restarts the tasks when one exits with its requeue code; Slurm needs nothing.
                sys.exit(LOCAL_REQUEUE_RETURN_CODE if job_env.cluster == "local" else 0)
            if _mtime_ns(rank0_result) != rank0_result_mtime:
                raise RuntimeError(f"rank 0 of job {job_env.job_id} did not requeue after the save (see "
                                   f"{rank0_result.parent}); the run can be resumed by resubmitting it")
            time.sleep(_POLL_S)
        raise RuntimeError(f"rank 0 of job {job_env.job_id} neither requeued nor failed within "
                           f"{RANK0_DECISION_TIMEOUT_S:.0f} s after the save")

    # ------------------------------------------------------------------------------------ submitit's requeue hook
    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """The next submission of this job: same entry and arguments, plus the resume point it will start from.

        Called by submitit on rank 0 only, possibly inside a signal handler: it runs no collective and saves no
        state (the trainer has already saved, or resumes from its last periodic checkpoint).
        """
        nxt = type(self)(self.entry, self.argv, self.run_dir, self.repo_root, self.jobs_root)
        nxt.requeues = self.requeues + 1
        if self.entry == ENTRY_TRAIN:
            nxt.resume_checkpoint, nxt.resume_step = self._resume_point_or_error()
        job_env = submitit.JobEnvironment()
        self._record("checkpoint", job_env, None, requeues=nxt.requeues, resume_checkpoint=nxt.resume_checkpoint,
                     resume_step=nxt.resume_step)
        return DelayedSubmission(nxt, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------- bookkeeping
    def _resume_point_or_error(self) -> tuple[str | None, int | None]:
        if self.entry != ENTRY_TRAIN:
            return None, None
        try:
            return resume_point(Path(self.run_dir))
        except Exception as exc:  # informational only: a requeue must not fail on bookkeeping
            print(f"[ssl_vil launcher] could not read the resume point of {self.run_dir}: {exc!r}", flush=True)
            return None, None

    def _record(self, event: str, job_env: submitit.JobEnvironment, dist: DistributedEnv | None,
                **fields: Any) -> None:
        """Append one line to ``RUN/slurm/launcher_events.jsonl`` (rank 0 only): how to follow starts/requeues."""
        rec = {"time_utc": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event,
               "entry": self.entry, "job_id": job_env.job_id, "restart_count": restart_count(),
               "requeues": self.requeues, "recorded_resume_step": self.resume_step,
               "world_size": dist.world_size if dist else job_env.num_tasks, **fields}
        from ssl_vil.infra.files import append_jsonl

        try:
            append_jsonl(Path(self.jobs_root) / EVENTS_FILENAME, rec)
        except OSError as exc:
            print(f"[ssl_vil launcher] could not write {EVENTS_FILENAME}: {exc!r}", flush=True)
        print(f"[ssl_vil launcher] {json.dumps(rec)}", flush=True)

    def __repr__(self) -> str:
        return (f"EntryJob(entry={self.entry!r}, run_dir={self.run_dir!r}, argv={self.argv!r}, "
                f"requeues={self.requeues}, resume_step={self.resume_step})")
