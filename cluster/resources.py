"""What a job asks the scheduler for, and how that becomes sbatch lines or local-executor parameters.

submitit's own defaults are wrong for long training runs, so every one that matters is set here explicitly:

* ``--time``: submitit uses 5 minutes when no timeout is given; we default to :data:`DEFAULT_TIMEOUT_MIN`.
* ``--signal=USR2@N``: the warning before the time limit must cover one training step plus one checkpoint save.
* ``max_num_timeout``: submitit requeues a checkpointable job at most 3 times after a time limit by default; a
  multi-day run on a 24 h partition needs more.
* ``--wckey``: submitit writes ``--wckey=submitit``, which clusters without that wckey reject; we write none.
* ``CUDA_VISIBLE_DEVICES`` is never rewritten per task: each task sees the node's GPUs and the trainer selects
  ``cuda:LOCAL_RANK`` itself.
* ``OMP_NUM_THREADS``: without it every task starts one intra-op thread per core of the node, and 8 tasks plus
  their loader workers oversubscribe the CPUs (10x slower steps measured on CPU); set per task, as torchrun does.
* ``--requeue``: clusters with ``JobRequeue=0`` refuse ``scontrol requeue`` for jobs that did not ask for it.
* ``srun --kill-on-bad-exit=1``: a rank that crashes takes the step down instead of leaving the others blocked in a
  collective until the process-group timeout.
* The job folder (pickles, sbatch script, per-task logs) lives inside the run directory, ``RUN/slurm/%j``, so it is
  on the shared filesystem and survives requeues (same job id).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm import slurm as submitit_slurm

DEFAULT_TIMEOUT_MIN = 1440  # 24 h, the longest limit common on GPU partitions; requeues continue the run
DEFAULT_SIGNAL_DELAY_S = 120  # one step + one checkpoint save, with margin; Slurm may signal up to ~60 s early
DEFAULT_MAX_NUM_TIMEOUT = 30  # 30 × 24 h of time limits before submitit gives up requeueing
JOBS_DIRNAME_SLURM = "slurm"
JOBS_DIRNAME_LOCAL = "local"


@dataclass(frozen=True, kw_only=True)
class JobResources:
    """Resources of one job. ``tasks_per_node`` is the number of GPUs per node (one task per GPU) when
    ``use_gpus`` is true, and the number of CPU processes per node otherwise."""

    nodes: int = 1
    tasks_per_node: int = 1
    use_gpus: bool = True
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None  # 0 = all memory of the node
    timeout_min: int = DEFAULT_TIMEOUT_MIN
    signal_delay_s: int = DEFAULT_SIGNAL_DELAY_S
    max_num_timeout: int = DEFAULT_MAX_NUM_TIMEOUT
    job_name: str = "ssl_vil"
    wckey: str | None = None
    omp_threads: int | None = None  # OMP_NUM_THREADS per task; None leaves it to the environment
    setup: tuple[str, ...] = ()  # shell lines run in the batch script before srun (module load, exports)

    def __post_init__(self) -> None:
        def need(ok: bool, option: str, value: Any, expected: str) -> None:
            if not ok:
                raise ValueError(f"{option}: got {value!r}, expected {expected}")

        need(self.nodes >= 1, "--nodes", self.nodes, "a positive integer")
        need(self.tasks_per_node >= 1, "--gpus-per-node", self.tasks_per_node, "a positive integer")
        need(self.timeout_min >= 1, "--timeout-min", self.timeout_min, "a positive number of minutes")
        need(0 <= self.signal_delay_s < 60 * self.timeout_min, "--signal-delay-s", self.signal_delay_s,
             f"0 <= seconds < --timeout-min × 60 = {60 * self.timeout_min}")
        need(self.max_num_timeout >= 0, "--max-num-timeout", self.max_num_timeout, "a non-negative integer")
        need(self.cpus_per_task is None or self.cpus_per_task >= 1, "--cpus-per-task", self.cpus_per_task,
             "a positive integer")
        need(self.mem_gb is None or self.mem_gb >= 0, "--mem-gb", self.mem_gb,
             "a non-negative integer (0 = whole node)")
        need(self.omp_threads is None or self.omp_threads >= 1, "OMP_NUM_THREADS", self.omp_threads,
             "a positive integer")
        need(bool(self.job_name) and not any(c.isspace() for c in self.job_name), "--job-name", self.job_name,
             "a non-empty name without spaces")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def jobs_root(run_dir: Path, *, local: bool) -> Path:
    """``RUN/slurm`` (or ``RUN/local``): per-job folders plus the launcher's event log."""
    return Path(run_dir).absolute() / (JOBS_DIRNAME_LOCAL if local else JOBS_DIRNAME_SLURM)


def job_folder(run_dir: Path, *, local: bool) -> Path:
    """submitit's folder template ``RUN/slurm/%j``; ``%j`` becomes the job id (kept across requeues)."""
    return jobs_root(run_dir, local=local) / "%j"


def pythonpath_setup_line(repo_root: Path) -> str:
    """The job process unpickles :class:`cluster.job.EntryJob` by import path, so the project root must be
    importable whatever directory the job starts in."""
    return f"export PYTHONPATH={shlex.quote(str(repo_root))}${{PYTHONPATH:+:$PYTHONPATH}}"


def setup_lines(res: JobResources, repo_root: Path) -> list[str]:
    """Shell lines before the job command: import path, thread count, then the user's lines (which may override)."""
    lines = [pythonpath_setup_line(repo_root)]
    if res.omp_threads is not None:
        lines.append(f"export OMP_NUM_THREADS={res.omp_threads}")
    return lines + list(res.setup)


def slurm_parameters(res: JobResources, repo_root: Path) -> dict[str, Any]:
    """Parameters for ``submitit.SlurmExecutor.update_parameters`` (Slurm's own names)."""
    params: dict[str, Any] = {
        "job_name": res.job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "gpus_per_node": res.tasks_per_node if res.use_gpus else None,
        "cpus_per_task": res.cpus_per_task,
        "mem": None if res.mem_gb is None else f"{res.mem_gb}GB",
        "time": res.timeout_min,
        "signal_delay_s": res.signal_delay_s,
        "partition": res.partition,
        "account": res.account,
        "qos": res.qos,
        "constraint": res.constraint,
        "exclude": res.exclude,
        # None drops the line; submitit's default would write --wckey=submitit.
        "wckey": res.wckey,
        "setup": setup_lines(res, repo_root),
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": {"requeue": True},
    }
    return params


def local_parameters(res: JobResources, repo_root: Path) -> dict[str, Any]:
    """Parameters for ``submitit.LocalExecutor.update_parameters`` (one node, ``tasks_per_node`` processes)."""
    if res.nodes != 1:
        raise ValueError(f"--nodes: got {res.nodes}, expected 1 with --local (the local executor runs on this "
                         f"machine only)")
    return {
        "nodes": 1,
        "tasks_per_node": res.tasks_per_node,
        # The local executor sets CUDA_VISIBLE_DEVICES to the first N GPUs (N = 0 hides them all, as a CPU run wants).
        "gpus_per_node": res.tasks_per_node if res.use_gpus else 0,
        "timeout_min": res.timeout_min,
        "signal_delay_s": res.signal_delay_s,
        "setup": setup_lines(res, repo_root),
    }


def submitit_command(folder: Path, python: str = sys.executable) -> str:
    """The command srun runs in every task (what ``SlurmExecutor`` writes for a single job)."""
    return f"{shlex.quote(python)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def render_sbatch(res: JobResources, run_dir: Path, repo_root: Path, python: str = sys.executable) -> str:
    """The sbatch script :func:`make_executor` submits, rendered without a Slurm installation (``--dry-run``)."""
    folder = job_folder(run_dir, local=False)
    return submitit_slurm._make_sbatch_string(command=submitit_command(folder, python), folder=folder,
                                              **slurm_parameters(res, repo_root))


def make_executor(res: JobResources, run_dir: Path, repo_root: Path, *, local: bool) -> submitit.Executor:
    """A configured ``SlurmExecutor`` (or ``LocalExecutor`` with ``local=True``) whose folder is ``RUN/slurm/%j``."""
    folder = job_folder(run_dir, local=local)
    if local:
        ex: submitit.Executor = submitit.LocalExecutor(folder=folder, max_num_timeout=res.max_num_timeout)
        ex.update_parameters(**local_parameters(res, repo_root))
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=res.max_num_timeout)
    ex.update_parameters(**slurm_parameters(res, repo_root))
    return ex
