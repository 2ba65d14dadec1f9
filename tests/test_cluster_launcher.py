"""Slurm launcher without a cluster: rank variables, the sbatch script, config checks, the requeue contract.

The requeue test drives submitit's own ``SignalHandler`` with a mocked clock, as submitit's
``slurm/test_slurm.py`` does: a preemption at 30/60 min, a time limit at 50/60 min, then one time limit too many.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path
from unittest.mock import patch

import pytest
import submitit
import torch
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, UncompletedJobError
from submitit.slurm.slurm import SlurmExecutor, SlurmJobEnvironment
from submitit.slurm.test_slurm import mocked_slurm

from cluster import submit as submit_cli
from cluster.dist_env import export_distributed_env, master_port_for
from cluster.job import EVENTS_FILENAME, EntryJob, resume_point
from cluster.resources import (
    DEFAULT_MAX_NUM_TIMEOUT,
    DEFAULT_SIGNAL_DELAY_S,
    DEFAULT_TIMEOUT_MIN,
    JobResources,
    jobs_root,
    make_executor,
    render_sbatch,
)
from ssl_vil.checkpoint import CheckpointManager, latest_checkpoint
from ssl_vil.config import load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "sbatch_2x8.txt"
IN1K_RECIPE = REPO / "recipes" / "vil2_s16_dinov2_in1k.yaml"
DEMO_RECIPE = REPO / "recipes" / "demo_digits.yaml"
# the digits recipe shortened to a 20-step run
SHORT = ["schedule.total_steps=20", "schedule.warmup_steps=2", "schedule.freeze_last_layer_steps=1"]
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture()
def clean_dist_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Register every variable the exporter writes, so monkeypatch restores them after the test."""
    for name in (*DIST_VARS, "SLURM_RESTART_COUNT", "CUDA_VISIBLE_DEVICES", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _fake_slurm_task(mp: pytest.MonkeyPatch, *, node: int, local: int, tasks_per_node: int, nodelist: str,
                     num_nodes: int, job_id: str = "4242") -> None:
    mp.setenv("SUBMITIT_EXECUTOR", "slurm")
    mp.setenv("SLURM_JOB_ID", job_id)
    mp.setenv("SLURM_NTASKS", str(num_nodes * tasks_per_node))
    mp.setenv("SLURM_JOB_NUM_NODES", str(num_nodes))
    mp.setenv("SLURM_JOB_NODELIST", nodelist)
    mp.setenv("SLURM_NODEID", str(node))
    mp.setenv("SLURM_LOCALID", str(local))
    mp.setenv("SLURM_PROCID", str(node * tasks_per_node + local))  # Slurm's block distribution
    for name in DIST_VARS:
        mp.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------- rank variables
def test_rank_variables_two_nodes_by_eight_tasks(clean_dist_env: pytest.MonkeyPatch) -> None:
    mp = clean_dist_env
    mp.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    hosts = ["gpu07", "gpu08"]
    seen = []
    for node in range(2):
        for local in range(8):
            _fake_slurm_task(mp, node=node, local=local, tasks_per_node=8, nodelist="gpu[07-08]", num_nodes=2)
            d = export_distributed_env()
            got = {k: os.environ[k] for k in DIST_VARS}
            assert got["MASTER_ADDR"] == hosts[0] == d.master_addr
            assert got["RANK"] == str(8 * node + local) and d.rank == 8 * node + local
            assert got["WORLD_SIZE"] == "16" and got["LOCAL_WORLD_SIZE"] == "8"
            assert got["LOCAL_RANK"] == str(local) and d.local_rank == local
            assert (d.node_rank, d.num_nodes) == (node, 2)
            # each task keeps every GPU of its node; the trainer picks cuda:LOCAL_RANK
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
            seen.append((d.rank, got["MASTER_PORT"]))
    assert sorted(r for r, _ in seen) == list(range(16))
    ports = {p for _, p in seen}
    assert len(ports) == 1, "all tasks of a job must agree on the rendezvous port"
    port = int(ports.pop())
    assert 20000 <= port < 60000 and port == master_port_for("4242", 0)


def test_master_port_changes_on_requeue_and_explicit_port_wins(clean_dist_env: pytest.MonkeyPatch) -> None:
    mp = clean_dist_env
    _fake_slurm_task(mp, node=1, local=0, tasks_per_node=1, nodelist="a[1-2],b3", num_nodes=3)
    first = export_distributed_env()
    assert first.master_addr == "a1" and first.rank == 1 and first.world_size == 3
    for name in DIST_VARS:
        mp.delenv(name)
    mp.setenv("SLURM_RESTART_COUNT", "1")
    second = export_distributed_env()
    assert second.master_port == master_port_for("4242", 1) != first.master_port
    for name in DIST_VARS:
        mp.delenv(name)
    mp.setenv("MASTER_PORT", "29555")
    assert export_distributed_env().master_port == 29555
    # values left over from another job are replaced, not trusted
    mp.setenv("RANK", "7")
    mp.setenv("MASTER_ADDR", "elsewhere")
    third = export_distributed_env()
    assert os.environ["RANK"] == "1" and os.environ["MASTER_ADDR"] == "a1" and third.rank == 1


# --------------------------------------------------------------------------------------------- sbatch script
def _normalise(text: str, run_dir: Path) -> str:
    # the interpreter lives inside the repo (.venv), so it is replaced first
    return text.replace(sys.executable, "<PYTHON>").replace(str(run_dir), "<RUN>").replace(str(REPO), "<REPO>")


def _sbatch_part(dry_run_output: str) -> str:
    return dry_run_output.split("\n# every task runs:", 1)[0].rstrip("\n") + "\n"


def test_dry_run_sbatch_matches_golden(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "vil2s_dinov2"
    rc = submit_cli.main([
        "--config", str(IN1K_RECIPE), "--output-dir", str(run_dir), "--nodes", "2", "--gpus-per-node", "8",
        "--partition", "gpu", "--account", "proj123", "--qos", "normal", "--constraint", "h100",
        "--cpus-per-task", "12", "--mem-gb", "0", "--timeout-min", "2880", "--signal-delay-s", "180",
        "--exclude", "gpu[01-02]", "--setup", "export NCCL_DEBUG=WARN", "--dry-run",
        "data.train=/data/imagenet-wds/train"])
    out = capsys.readouterr().out
    assert rc == 0
    assert not run_dir.exists(), "--dry-run must not write anything"
    script = _normalise(_sbatch_part(out), run_dir)
    if os.environ.get("SSL_VIL_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), (
        f"sbatch script differs from {GOLDEN} (rerun with SSL_VIL_UPDATE_GOLDEN=1 if the change is intended):\n"
        f"{script}")
    lines = script.splitlines()
    # the defaults that bite, checked by name so a regenerated golden cannot drop them silently
    assert not any("wckey" in line for line in lines)
    for want in ("#SBATCH --time=2880", "#SBATCH --signal=USR2@180", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --requeue", "#SBATCH --output=<RUN>/slurm/%j/%j_0_log.out"):
        assert want in lines, want
    assert "CUDA_VISIBLE_DEVICES" not in script
    # the resolved config follows the script, with the job's world size
    cfg_text = out.split("on submit:\n", 1)[1]
    assert "world_size: 16" in cfg_text and "train: /data/imagenet-wds/train" in cfg_text


def test_dry_run_shows_exactly_what_the_executor_submits(tmp_path: Path) -> None:
    res = JobResources(nodes=2, tasks_per_node=8, partition="gpu", cpus_per_task=12, mem_gb=0)
    with patch.object(SlurmExecutor, "affinity", classmethod(lambda cls: 2)):
        ex = make_executor(res, tmp_path / "run", REPO, local=False)
    submitted = ex._make_submission_file_text(ex._submitit_command_str, "uid")
    assert submitted == render_sbatch(res, tmp_path / "run", REPO)
    assert ex.max_num_timeout == DEFAULT_MAX_NUM_TIMEOUT
    assert ex.folder == tmp_path / "run" / "slurm" / "%j"


def test_explicit_defaults() -> None:
    res = JobResources()
    assert (res.timeout_min, res.signal_delay_s, res.max_num_timeout) == (
        DEFAULT_TIMEOUT_MIN, DEFAULT_SIGNAL_DELAY_S, DEFAULT_MAX_NUM_TIMEOUT)
    assert res.timeout_min >= 60 and res.max_num_timeout >= 10  # never submitit's 5 min / 3 requeues
    script = render_sbatch(res, Path("/runs/r"), REPO)
    assert "#SBATCH --time=1440" in script and "wckey" not in script and "#SBATCH --signal=USR2@120" in script
    with pytest.raises(ValueError, match="--signal-delay-s"):
        JobResources(timeout_min=1, signal_delay_s=60)
    with pytest.raises(ValueError, match="--nodes"):
        JobResources(nodes=0)


def test_cpu_cluster_requests_no_gpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # overrides may sit between launcher options
    rc = submit_cli.main(["--config", str(DEMO_RECIPE), *SHORT[:1], "--output-dir", str(tmp_path / "r"), "--nodes",
                          "2", "--gpus-per-node", "2", *SHORT[1:], "data.num_workers=1", "--cpu", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "#SBATCH --ntasks-per-node=2" in out and "gpus" not in _sbatch_part(out)
    assert "#SBATCH --cpus-per-task=2" in out  # data.num_workers (1) + 1
    assert "export OMP_NUM_THREADS=1" in out  # the CPUs the loader workers leave to the training process


# ------------------------------------------------------------------------------------- validation on login node
@pytest.mark.parametrize("extra, message", [
    (["optim.lrr=1"], "optim.lrr: unknown key; did you mean optim.lr?"),
    (["--nodes", "3", "--gpus-per-node", "7"], "optim.global_batch_size"),
])
def test_config_errors_surface_before_submission(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 extra: list[str], message: str) -> None:
    run_dir = tmp_path / "run"
    argv = ["--config", str(DEMO_RECIPE), "--output-dir", str(run_dir), *extra]
    with patch.object(submit_cli, "submit", side_effect=AssertionError("must not submit")):
        rc = submit_cli.main(argv)
    err = capsys.readouterr().err
    assert rc == submit_cli.EXIT_USAGE and message in err, err
    assert not run_dir.exists()


def test_launcher_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(tmp_path / "r")
    cases = [
        (["--output-dir", run], "--config: required"),
        (["--entry", "knn", "--config", str(DEMO_RECIPE), "--output-dir", run], "--config: only for --entry train"),
        (["--config", str(DEMO_RECIPE), "--output-dir", run, "--local", "--nodes", "2", "--gpus-per-node", "1",
          "--cpu"], "--nodes: got 2, expected 1 with --local"),
        (["--config", str(DEMO_RECIPE), "--output-dir", run, "--timeout-min", "1", "--signal-delay-s", "90"],
         "--signal-delay-s: got 90"),
    ]
    for argv, message in cases:
        assert submit_cli.main(argv) == submit_cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err, (argv, err)


def test_submit_freezes_the_validated_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    argv = ["--config", str(DEMO_RECIPE), "--output-dir", str(run_dir), "--nodes", "2", "--gpus-per-node", "1",
            "--cpu", *SHORT, "optim.lr=0.001"]
    with mocked_slurm():
        job = submit_cli.submit(submit_cli.prepare(argv))
    assert f"submitted train job {job.job_id}" in capsys.readouterr().out
    delayed = DelayedSubmission.load(job.paths.submitted_pickle)
    entry: EntryJob = delayed.function
    assert isinstance(entry, EntryJob) and entry.entry == "train" and entry.run_dir == str(run_dir)
    assert entry.argv[:1] == ["--config"] and entry.argv[2:] == ["--output-dir", str(run_dir)]
    frozen = Path(entry.argv[1])
    assert frozen.parent == run_dir / "slurm"
    expected = load_config(DEMO_RECIPE, [*SHORT, "optim.lr=0.001"], world_size=2)
    assert frozen.read_text() == to_yaml(expected)
    assert to_yaml(load_config(frozen, [], world_size=2)) == to_yaml(expected)  # the job resolves the same config
    assert job.paths.submitted_pickle.parent == run_dir / "slurm" / job.job_id
    assert "--wckey" not in job.paths.submission_file.read_text()


# ------------------------------------------------------------------------------------------- requeue contract
@pytest.fixture()
def fast_forward_clock(monkeypatch: pytest.MonkeyPatch):
    """Mocked wall clock, as in submitit's own tests: fast_forward(minutes) moves time.time() ahead."""
    now = [time.time()]
    monkeypatch.setattr(time, "time", lambda: now[0])

    def fast_forward(minutes: float) -> None:
        now[0] += minutes * 60

    return fast_forward


def _save(run_dir: Path, step: int) -> None:
    mgr = CheckpointManager(run_dir, keep_last=2, keep_every_steps=None, config_hash="cfg", world_size=1,
                            git_sha=None)
    mgr.save(step, {"w": torch.full((4,), float(step))})


def _handler_of(job: submitit.Job) -> SignalHandler:
    """What submitit builds in the job process at start-up (time starts now)."""
    return SignalHandler(SlurmJobEnvironment(), job.paths, DelayedSubmission.load(job.paths.submitted_pickle))


def test_requeue_contract_with_submitit_signal_handler(tmp_path: Path, fast_forward_clock,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    _save(run_dir, 7)
    res = JobResources(nodes=2, tasks_per_node=1, use_gpus=False, timeout_min=60, max_num_timeout=1)
    argv = ["--config", "cfg.yaml", "--output-dir", str(run_dir)]
    with mocked_slurm() as mock:
        ex = make_executor(res, run_dir, REPO, local=False)
        job = ex.submit(EntryJob("train", argv, run_dir, REPO, jobs_root(run_dir, local=False)))
    usr_sig = submitit.JobEnvironment._usr_sig()
    assert usr_sig == signal.SIGUSR2
    monkeypatch.setenv("SLURM_PROCID", "0")

    with mock.job_context(job.job_id):
        # 1. preempted after 30 of 60 minutes: requeued, the time-out budget (1) is untouched
        sig = _handler_of(job)
        fast_forward_clock(minutes=30)
        with pytest.raises(SystemExit), patch.object(SlurmJobEnvironment, "_requeue") as requeue:
            sig.checkpoint_and_try_requeue(usr_sig)
        requeue.assert_called_once_with(1)
        first = DelayedSubmission.load(job.paths.submitted_pickle)
        assert first._timeout_countdown == 1
        assert first.function.resume_checkpoint == str(latest_checkpoint(run_dir)) == str(
            run_dir / "checkpoints" / "step_00000007")
        assert first.function.resume_step == 7 and first.function.requeues == 1
        assert first.function.argv == argv and first.function.entry == "train"

        # 2. the resumed run saved step 12, then hit the time limit at 50/60 minutes: requeued with budget 0
        _save(run_dir, 12)
        sig = _handler_of(job)
        fast_forward_clock(minutes=50)
        with pytest.raises(SystemExit), patch.object(SlurmJobEnvironment, "_requeue") as requeue:
            sig.checkpoint_and_try_requeue(usr_sig)
        requeue.assert_called_once_with(0)
        second = DelayedSubmission.load(job.paths.submitted_pickle)
        assert second._timeout_countdown == 0
        assert (second.function.resume_step, second.function.requeues) == (12, 2)
        assert resume_point(run_dir) == (second.function.resume_checkpoint, 12)

        # 3. a third time limit: submitit gives up, nothing is requeued
        sig = _handler_of(job)
        fast_forward_clock(minutes=55)
        with pytest.raises(UncompletedJobError, match="timed-out too many times"), \
                patch.object(SlurmJobEnvironment, "_requeue") as requeue:
            sig.checkpoint_and_try_requeue(usr_sig)
        requeue.assert_not_called()

        # a task other than rank 0 never requeues (submitit's rule; the trainer saves on every rank itself)
        monkeypatch.setenv("SLURM_PROCID", "1")
        with patch.object(SlurmJobEnvironment, "_requeue") as requeue:
            assert _handler_of(job).checkpoint_and_try_requeue(usr_sig) is None
        requeue.assert_not_called()

    events = [json.loads(line) for line in (run_dir / "slurm" / EVENTS_FILENAME).read_text().splitlines()]
    assert [(e["event"], e["resume_step"], e["requeues"]) for e in events] == [
        ("checkpoint", 7, 1), ("checkpoint", 12, 2), ("checkpoint", 12, 3)]
    assert all(e["job_id"] == job.job_id for e in events)


# ----------------------------------------------------------------------------- the job callable, in process
@pytest.fixture()
def submitted_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_dist_env: pytest.MonkeyPatch):
    """An EntryJob submitted to a mocked Slurm, and this process dressed as its task 0 with submitit's real
    signal handlers installed (what ``python -m submitit.core._submit`` does before calling the job)."""
    run_dir = tmp_path / "run"
    res = JobResources(nodes=1, tasks_per_node=1, use_gpus=False, timeout_min=60, max_num_timeout=2)
    with mocked_slurm():
        ex = make_executor(res, run_dir, REPO, local=False)
        job = ex.submit(EntryJob("train", ["--config", "c.yaml", "--output-dir", str(run_dir)], run_dir, REPO,
                                 jobs_root(run_dir, local=False)))
    _fake_slurm_task(monkeypatch, node=0, local=0, tasks_per_node=1, nodelist="node1", num_nodes=1,
                     job_id=job.job_id)
    monkeypatch.setenv("SUBMITIT_FOLDER", str(job.paths.folder))
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}
    delayed = DelayedSubmission.load(job.paths.submitted_pickle)
    SlurmJobEnvironment()._handle_signals(job.paths, delayed)
    yield job, delayed, run_dir
    for s, h in saved.items():
        signal.signal(s, h)


def _entry_returning(monkeypatch: pytest.MonkeyPatch, value: object, calls: list[list[str]]) -> None:
    def main(argv: list[str]) -> object:
        calls.append(list(argv))
        if isinstance(value, BaseException):
            raise value
        return value

    monkeypatch.setattr("cluster.job.load_entry", lambda entry, root: (main, 75))


def test_job_success_returns_result_and_ignores_late_signals(submitted_job, monkeypatch: pytest.MonkeyPatch) -> None:
    job, delayed, run_dir = submitted_job
    calls: list[list[str]] = []
    _entry_returning(monkeypatch, 0, calls)
    result = delayed.result()
    assert calls == [["--config", "c.yaml", "--output-dir", str(run_dir)]]
    assert result["exit_code"] == 0 and result["rank"] == 0 and result["job_id"] == job.job_id
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "node1"
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    events = [json.loads(x) for x in (run_dir / "slurm" / EVENTS_FILENAME).read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "finished"]


def test_job_requeues_through_submitit_when_the_trainer_saved(submitted_job, monkeypatch: pytest.MonkeyPatch) -> None:
    job, delayed, run_dir = submitted_job
    _save(run_dir, 5)  # what the trainer wrote before returning the requeue code
    _entry_returning(monkeypatch, 75, [])
    with patch.object(SlurmJobEnvironment, "_requeue") as requeue, pytest.raises(SystemExit):
        delayed.result()
    requeue.assert_called_once_with(2)  # a preemption at minute 0 of 60 keeps the time-out budget
    nxt = DelayedSubmission.load(job.paths.submitted_pickle)
    assert (nxt.function.resume_step, nxt.function.requeues, nxt._timeout_countdown) == (5, 1, 2)


@pytest.mark.parametrize("outcome, message", [(3, "exited with code 3"), (SystemExit(2), "exited with code 2")])
def test_job_failure_is_reported(submitted_job, monkeypatch: pytest.MonkeyPatch, outcome: object,
                                 message: str) -> None:
    job, delayed, run_dir = submitted_job
    _entry_returning(monkeypatch, outcome, [])
    with patch.object(SlurmJobEnvironment, "_requeue") as requeue, pytest.raises(RuntimeError, match=message):
        delayed.result()
    requeue.assert_not_called()
    events = [json.loads(x) for x in (run_dir / "slurm" / EVENTS_FILENAME).read_text().splitlines()]
    assert events[-1]["event"] == "failed"


@pytest.mark.parametrize("cluster, touched, expected", [
    ("slurm", "submitted", 0), ("local", "submitted", 144), ("slurm", "result", RuntimeError)])
def test_other_ranks_follow_rank0_decision(tmp_path: Path, cluster: str, touched: str, expected: object) -> None:
    submitted, result = tmp_path / "7_submitted.pkl", tmp_path / "7_0_result.pkl"
    submitted.write_bytes(b"first")
    before = submitted.stat().st_mtime_ns
    job = EntryJob("train", [], tmp_path, REPO, tmp_path)
    env = types.SimpleNamespace(cluster=cluster, job_id="7")

    def rank0_decides() -> None:
        time.sleep(0.3)
        target = submitted if touched == "submitted" else result
        target.write_bytes(b"decision")
        os.utime(target, ns=(before + 10**9, before + 10**9))

    threading.Thread(target=rank0_decides).start()
    if expected is RuntimeError:
        with pytest.raises(RuntimeError, match="did not requeue"):
            job._follow_rank0(env, submitted, before, result, None)
    else:
        with pytest.raises(SystemExit) as exc:
            job._follow_rank0(env, submitted, before, result, None)
        assert exc.value.code == expected


def test_eval_entries_are_validated_before_queueing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistake in an eval job's own arguments fails here, not hours later in the queue."""
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"not checked here")
    data = tmp_path / "data"
    data.mkdir()
    out = str(tmp_path / "knn_out")
    good = ["--weights", str(weights), "--train-data", str(data), "--val-data", str(data), "--output-dir", out]
    cases = [
        (["--", *good[:1], str(tmp_path / "missing.safetensors"), *good[2:]],
         f"--entry knn: --weights {tmp_path / 'missing.safetensors'}: no such file or directory"),
        (["--", *good[:-2]], "--entry knn: pass --output-dir after `--`"),
        (["--", *good[:2], "--train-data", str(tmp_path / "nodata"), *good[4:]],
         f"--entry knn: --train-data {tmp_path / 'nodata'}: no such file or directory"),
        (["--", *good, "--k", "0"], "expected neighbour counts >= 1"),
        (["--", *good, "--bogus"], "arguments after `--` for --entry knn are invalid"),
    ]
    for tail, message in cases:
        with patch.object(submit_cli, "submit", side_effect=AssertionError("must not submit")):
            rc = submit_cli.main(["--entry", "knn", "--output-dir", str(tmp_path / "job"), "--cpu", *tail])
        err = capsys.readouterr().err
        assert rc == submit_cli.EXIT_USAGE and message in err and "Traceback" not in err, (tail, err)
    ft = ["--entry", "finetune", "--output-dir", str(tmp_path / "job"), "--cpu", "--", "--config",
          str(DEMO_RECIPE.parent / "finetune_digits.yaml"), "--output-dir", out, "--weights", str(tmp_path / "nope")]
    with patch.object(submit_cli, "submit", side_effect=AssertionError("must not submit")):
        assert submit_cli.main(ft) == submit_cli.EXIT_USAGE
    assert f"--entry finetune: --weights {tmp_path / 'nope'}: no such file or directory" in capsys.readouterr().err
    seg = ["--entry", "segment", "--output-dir", str(tmp_path / "job"), "--cpu", "--", "--config",
           str(DEMO_RECIPE.parent / "segment_digits.yaml"), "--output-dir", out]
    with patch.object(submit_cli, "submit", side_effect=AssertionError("must not submit")):
        assert submit_cli.main([*seg, "data.val=" + str(tmp_path / "noval")]) == submit_cli.EXIT_USAGE
        assert submit_cli.main([*seg, "data.crop_sise=64"]) == submit_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"--entry segment: data.val {tmp_path / 'noval'}: no such file or directory" in err
    assert "did you mean data.crop_size" in err and "Traceback" not in err
    plan = submit_cli.prepare(seg)  # the built-in data set needs no files
    assert plan.args.entry == "segment" and plan.entry_args == seg[6:]
    plan = submit_cli.prepare(["--entry", "knn", "--output-dir", str(tmp_path / "job"), "--cpu", "--", *good])
    assert plan.entry_args == good and not (tmp_path / "job").exists()
