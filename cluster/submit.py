"""Launch ssl_vil pretraining (or an evaluation) as a Slurm job through submitit.

    python cluster/submit.py --config recipes/X.yaml --output-dir RUN --nodes 2 --gpus-per-node 8 [key=value ...]
    python cluster/submit.py --entry knn --output-dir RUN/knn --nodes 1 --gpus-per-node 1 -- <eval/knn.py args>

Pretraining mirrors ``python -m ssl_vil.train --config X --output-dir RUN key=value ...``: the config is loaded and
validated here, on the login node, with the job's world size (nodes × tasks per node), and checked against the
config an existing RUN was started with, so mistakes fail before anything is queued. The resolved config is
frozen into ``RUN/slurm/config-<hash>.yaml`` and the job runs exactly that file, however often it is requeued.
One task per GPU (``--ntasks-per-node = --gpus-per-node``); with ``--cpu`` the nodes have no GPUs and
``--gpus-per-node`` is the number of CPU processes per node.

``--dry-run`` prints the sbatch script and the resolved config and submits nothing. ``--local`` runs the same job
through submitit's local executor on this machine (one node) and waits for it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `cluster` and the project importable
    sys.path.insert(0, str(REPO_ROOT))

import submitit  # noqa: E402
from submitit.core.utils import FailedJobError, UncompletedJobError  # noqa: E402

from cluster.job import ENTRIES, ENTRY_MODULES, ENTRY_TRAIN, EVENTS_FILENAME, EntryJob  # noqa: E402
from cluster.resources import (  # noqa: E402
    DEFAULT_MAX_NUM_TIMEOUT,
    DEFAULT_SIGNAL_DELAY_S,
    DEFAULT_TIMEOUT_MIN,
    JobResources,
    jobs_root,
    make_executor,
    render_sbatch,
)
from ssl_vil.infra.cli_errors import HelpFormatter, add_version  # noqa: E402

EXIT_USAGE = 2
CLIENT_CONFIG_VARS = ("SLURM_CONF", "SLURM_CLUSTERS")


class LaunchError(Exception):
    """A launch request that cannot be submitted; the message names the option or key."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cluster/submit.py", description=__doc__, formatter_class=HelpFormatter)
    add_version(p)
    p.add_argument("--entry", choices=ENTRIES, default=ENTRY_TRAIN,
                   help="train: ssl_vil.train.cli.main; knn|linear|finetune|segment: eval/<name>.py main(argv) with the "
                        "arguments after `--`")
    p.add_argument("--config", help="recipe YAML (train entry)")
    p.add_argument("--output-dir", required=True,
                   help="run directory on a filesystem shared by all nodes; job files go to RUN/slurm/<job id>")
    res = p.add_argument_group("resources")
    res.add_argument("--nodes", type=int, default=1)
    res.add_argument("--gpus-per-node", type=int, default=1, metavar="G",
                     help="GPUs per node = tasks per node (one task per GPU); with --cpu: processes per node")
    res.add_argument("--cpu", action="store_true", help="the nodes have no GPUs: request none")
    res.add_argument("--partition")
    res.add_argument("--account")
    res.add_argument("--qos")
    res.add_argument("--constraint")
    res.add_argument("--exclude", help="nodes to avoid, Slurm node-list syntax")
    res.add_argument("--cpus-per-task", type=int,
                     help="default for train: data.num_workers + 1 (the loader workers plus the training process)")
    res.add_argument("--mem-gb", type=int, help="memory per node in GB; 0 = all of it; default: the partition's")
    res.add_argument("--timeout-min", type=int, default=DEFAULT_TIMEOUT_MIN,
                     help=f"time limit per (re)run in minutes (default {DEFAULT_TIMEOUT_MIN}); the job is requeued "
                          f"and resumes after it")
    res.add_argument("--signal-delay-s", type=int, default=DEFAULT_SIGNAL_DELAY_S,
                     help=f"USR2 this many seconds before the time limit (default {DEFAULT_SIGNAL_DELAY_S}); must "
                          f"cover one step plus one checkpoint save")
    res.add_argument("--max-num-timeout", type=int, default=DEFAULT_MAX_NUM_TIMEOUT,
                     help=f"requeues after a time limit before giving up (default {DEFAULT_MAX_NUM_TIMEOUT}); "
                          f"preemptions do not count")
    res.add_argument("--job-name", help="default: ssl_vil-<entry>-<run dir name>")
    res.add_argument("--wckey", help="Slurm wckey (default: none)")
    res.add_argument("--setup", action="append", default=[], metavar="LINE",
                     help="shell line run before srun, e.g. 'module load cuda/12.4' (repeatable); runs after the "
                          "launcher's own exports, so 'export OMP_NUM_THREADS=8' overrides its default (train: "
                          "cpus-per-task - data.num_workers; eval: cpus-per-task)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config only")
    mode.add_argument("--local", action="store_true", help="run with submitit's local executor and wait")
    p.add_argument("--wait", action="store_true", help="after submitting, wait for the job and print its results")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (train); for eval entries, arguments passed to main(argv)")
    return p


def split_entry_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Everything after the first ``--`` goes to the entry untouched (eval options may share launcher names)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _resources(args: argparse.Namespace, *, use_gpus: bool, cpus_per_task: int | None,
               omp_threads: int | None) -> JobResources:
    run_name = Path(args.output_dir).resolve().name or "run"
    try:
        return JobResources(
            nodes=args.nodes, tasks_per_node=args.gpus_per_node, use_gpus=use_gpus, partition=args.partition,
            account=args.account, qos=args.qos, constraint=args.constraint, exclude=args.exclude,
            cpus_per_task=cpus_per_task, mem_gb=args.mem_gb, timeout_min=args.timeout_min,
            signal_delay_s=args.signal_delay_s, max_num_timeout=args.max_num_timeout,
            job_name=args.job_name or f"ssl_vil-{args.entry}-{run_name}", wckey=args.wckey,
            omp_threads=omp_threads, setup=tuple(args.setup))
    except ValueError as exc:
        raise LaunchError(str(exc)) from None


def _load_train_config(args: argparse.Namespace, overrides: list[str], world_size: int, run_dir: Path) -> Any:
    from ssl_vil.config import ConfigError, load_config
    from ssl_vil.train.run_dir import check_resume_compatible

    if not args.config:
        raise LaunchError("--config: required for --entry train")
    try:
        cfg = load_config(args.config, overrides, world_size=world_size)
        check_resume_compatible(run_dir, cfg)
    except ConfigError as exc:
        raise LaunchError(f"config error: {exc}") from None
    return cfg


def check_eval_args(entry: str, argv: list[str]) -> None:
    """Validate an eval entry's arguments here, as the job would, plus what only matters in a batch job: the
    inputs must exist (on the shared filesystem the nodes see) and ``--output-dir`` must be given, or the job's
    results would exist only in a log."""
    import importlib

    from ssl_vil.config import ConfigError

    module = importlib.import_module(ENTRY_MODULES[entry])
    try:
        if entry in ("finetune", "segment"):
            ns = module.build_parser().parse_args(argv)
            weights = [f"model.weights={ns.weights}"] if ns.weights else []
            load = module.load_finetune_config if entry == "finetune" else module.load_segment_config
            cfg = load(ns.config, list(ns.overrides) + weights)
            inputs = {"--weights": cfg.model.weights, "data.train": cfg.data.train,
                      "data.val": cfg.data.val}
            output_dir = ns.output_dir
        else:
            cfg = module.parse_config(argv)
            inputs = {"--weights": cfg.weights, "--train-data": cfg.train_data, "--val-data": cfg.val_data}
            output_dir = cfg.output_dir
    except SystemExit:  # argparse has printed the usage and the offending option
        raise LaunchError(f"arguments after `--` for --entry {entry} are invalid (see above)") from None
    except ConfigError as exc:
        raise LaunchError(f"--entry {entry}: {exc}") from None
    if not output_dir:
        raise LaunchError(f"--entry {entry}: pass --output-dir after `--` (the job writes its results there)")
    for option, value in inputs.items():
        if value and "://" not in str(value) and not any(c in str(value) for c in "*?[{") \
                and not str(value).startswith("builtin:") \
                and not Path(value).exists():
            raise LaunchError(f"--entry {entry}: {option} {value}: no such file or directory")


@contextmanager
def submission_environment() -> Iterator[None]:
    """Environment for sbatch: without the SLURM_* / MASTER_* / RANK variables of an allocation we may be running
    in (a job submitted from inside one would inherit its task counts and rendezvous), but with the variables that
    configure the Slurm client itself, which ``submitit.helpers.clean_env`` would drop too: ``SLURM_CONF`` (where
    the cluster's config is), ``SLURM_CLUSTERS`` and the user's ``SBATCH_*`` defaults (e.g. ``SBATCH_ACCOUNT``)."""
    keep = {k: v for k, v in os.environ.items() if k in CLIENT_CONFIG_VARS or k.startswith("SBATCH_")}
    with submitit.helpers.clean_env():
        os.environ.update(keep)
        try:
            yield
        finally:
            for k in keep:
                os.environ.pop(k, None)  # clean_env puts the original values back


def write_frozen_config(cfg_yaml: str, path: Path) -> None:
    """Write the resolved config the job runs (content-addressed name, so rewriting is idempotent)."""
    from ssl_vil.infra.files import write_text_atomic

    write_text_atomic(path, cfg_yaml)


@dataclass(frozen=True)
class LaunchPlan:
    """A validated launch request: nothing has been written or submitted yet."""

    args: argparse.Namespace
    run_dir: Path
    resources: JobResources
    cfg_yaml: str | None  # resolved config (train entry)
    entry_args: list[str]  # eval entries: main(argv)

    @property
    def frozen_config_path(self) -> Path | None:
        if self.cfg_yaml is None:
            return None
        digest = hashlib.sha256(self.cfg_yaml.encode()).hexdigest()[:12]
        return jobs_root(self.run_dir, local=self.args.local) / f"config-{digest}.yaml"

    def make_job(self) -> EntryJob:
        if self.args.entry == ENTRY_TRAIN:
            entry_argv = ["--config", str(self.frozen_config_path), "--output-dir", str(self.run_dir)]
        else:
            entry_argv = list(self.entry_args)
        return EntryJob(self.args.entry, entry_argv, self.run_dir, REPO_ROOT,
                        jobs_root(self.run_dir, local=self.args.local))


def prepare(argv: list[str]) -> LaunchPlan:
    """Parse and validate a launch request (config included); writes nothing."""
    launcher_argv, entry_tail = split_entry_args(argv)
    args = build_parser().parse_intermixed_args(launcher_argv)
    run_dir = Path(args.output_dir).absolute()
    for option, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:  # before the config, whose check would name the product (WORLD_SIZE) instead
            raise LaunchError(f"{option}: got {value}, expected a positive integer")
    world_size = args.nodes * args.gpus_per_node
    cfg_yaml = None
    if args.entry == ENTRY_TRAIN:
        if entry_tail:
            raise LaunchError(f"arguments after `--` ({' '.join(entry_tail)}) are for eval entries; pass config "
                              f"overrides as key=value")
        cfg = _load_train_config(args, list(args.overrides), world_size, run_dir)
        from ssl_vil.config import to_yaml

        cfg_yaml = to_yaml(cfg)
        use_gpus = not args.cpu and cfg.train.device != "cpu"
        cpus = args.cpus_per_task if args.cpus_per_task is not None else cfg.data.num_workers + 1
        # the loader workers run single-threaded; the training process gets the task's remaining CPUs
        threads: int | None = max(1, cpus - cfg.data.num_workers)
    else:
        if args.config:
            raise LaunchError("--config: only for --entry train; pass eval arguments after `--`")
        check_eval_args(args.entry, list(args.overrides) + entry_tail)
        use_gpus = not args.cpu
        cpus = threads = args.cpus_per_task
    res = _resources(args, use_gpus=use_gpus, cpus_per_task=cpus, omp_threads=threads)
    return LaunchPlan(args=args, run_dir=run_dir, resources=res, cfg_yaml=cfg_yaml,
                      entry_args=list(args.overrides) + entry_tail)


def dry_run_text(plan: LaunchPlan) -> str:
    """The sbatch script, the command every task runs, and the resolved config."""
    job = plan.make_job()
    lines = [render_sbatch(plan.resources, plan.run_dir, REPO_ROOT).rstrip("\n"), "",
             f"# every task runs: {job.entry} main({json.dumps(job.argv)})"]
    if plan.cfg_yaml is not None:
        lines += [f"# resolved config, frozen to {plan.frozen_config_path} on submit:", plan.cfg_yaml.rstrip("\n")]
    return "\n".join(lines) + "\n"


def submit(plan: LaunchPlan) -> submitit.Job:
    """Freeze the config, then submit the job (Slurm, or the local executor with ``--local``)."""
    args, run_dir, res = plan.args, plan.run_dir, plan.resources
    try:
        executor = make_executor(res, run_dir, REPO_ROOT, local=args.local)
    except (ValueError, RuntimeError) as exc:
        raise LaunchError(str(exc)) from None
    if plan.cfg_yaml is not None:
        write_frozen_config(plan.cfg_yaml, plan.frozen_config_path)
    with submission_environment():
        job = executor.submit(plan.make_job())
    where = "local executor" if args.local else "Slurm"
    print(f"submitted {args.entry} job {job.job_id} ({where}, {res.nodes} node(s) × {res.tasks_per_node} task(s))")
    print(f"  run dir: {run_dir}")
    print(f"  logs:    {job.paths.stdout}  (task 0; other tasks: _<task>_log.out)")
    print(f"  events:  {jobs_root(run_dir, local=args.local) / EVENTS_FILENAME}")
    return job


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        plan = prepare(argv)
        if plan.args.dry_run:
            sys.stdout.write(dry_run_text(plan))
            return 0
        job = submit(plan)
    except LaunchError as exc:
        print(f"cluster/submit.py: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if plan.args.local or plan.args.wait:
        try:
            results = job.results()
        except (FailedJobError, UncompletedJobError) as exc:
            print(f"job {job.job_id} failed:\n{exc}", file=sys.stderr)
            return 1
        finally:
            _remove_template_folder(plan)
        print(job_summary(plan, str(job.job_id), results))
    return 0


def _remove_template_folder(plan: LaunchPlan) -> None:
    """The local executor's controller creates its folder template literally (``RUN/local/%j``) beside the real
    per-job folder; it holds nothing, so it goes once the job has ended (left alone if anything is in it)."""
    if plan.args.local:
        try:
            (jobs_root(plan.run_dir, local=True) / "%j").rmdir()
        except OSError:
            pass


def job_summary(plan: LaunchPlan, job_id: str, results: list[dict[str, Any]]) -> str:
    """What a finished job did, for people: one line per task, where the results were written, what to run next.
    The task results themselves go to ``RUN/<slurm|local>/results-<job id>.json``."""
    from ssl_vil.infra.files import write_json_atomic

    path = jobs_root(plan.run_dir, local=plan.args.local) / f"results-{job_id}.json"
    write_json_atomic(path, results)
    tasks = ", ".join(f"rank {r['rank']} exit {r['exit_code']}" for r in sorted(results, key=lambda r: r["rank"]))
    requeues = max((r.get("requeues", 0) for r in results), default=0)
    lines = [f"job {job_id} finished: {plan.args.entry}, {tasks}; requeued {requeues} time(s)",
             f"  task results: {path}"]
    if plan.args.entry == ENTRY_TRAIN:
        lines += [f"  run dir:      {plan.run_dir}",
                  f"  next:         python -m ssl_vil.report {plan.run_dir}",
                  f"                python -m ssl_vil.eval.knn --weights {plan.run_dir} --train-data TRAIN --val-data VAL"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
