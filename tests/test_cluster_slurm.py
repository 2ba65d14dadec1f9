"""The Slurm launcher against a real two-node Slurm cluster started by the tests (see tests/slurm_cluster.py).

Three pretraining jobs of a shortened digits recipe (world size 2, 16 steps) run side by side:

* ``ref``:     2 nodes × 1 task, uninterrupted: the reference final state.
* ``preempt``: 2 nodes × 1 task, preempted with ``scancel --signal=USR2`` mid-run (every process of the step gets
  the signal, DataLoader workers included); requeued, resumes from the step it saved.
* ``limit``:   1 node × 2 tasks with a real 1-minute time limit (``--signal=USR2@2``); requeued by the time limit
  until done.

Both interrupted runs must end bitwise equal to the reference (final checkpoint payload and exported weights), so
no step was lost or repeated. A k-NN evaluation job launched through the same launcher scores the reference.
The ``sleep`` fault (no effect on the numbers) stretches the interrupted runs so the signals land mid-run. The
whole module takes about 2.5 minutes on 2 busy cores (cluster start/stop included: ~7 s, plus ~7 s to install the
Slurm packages on a fresh Debian machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cluster import submit as submit_cli
from cluster.job import EVENTS_FILENAME

import faultinject
from slurm_cluster import SlurmCluster, SlurmUnavailable, running_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "cluster" / "submit.py"
RECIPE = REPO / "recipes" / "demo_digits.yaml"
TOTAL_STEPS = 16


def _train_overrides(shards: Path) -> list[str]:
    return [f"data.train={shards / 'train'}", "train.device=cpu", f"schedule.total_steps={TOTAL_STEPS}",
            "schedule.warmup_steps=2", "schedule.freeze_last_layer_steps=1", "optim.global_batch_size=8",
            "data.augment.n_local=2", "objective.dino_head.out_dim=256", "objective.dino_head.hidden_dim=128",
            "logging.log_every_steps=1", "logging.tensorboard=false",
            # no periodic checkpoint: a resume can only come from the save made on the signal (or from nothing)
            "checkpoint.every_steps=1000"]


def _sleep_fault(steps: range, secs: float) -> str:
    return f"sleep:steps={'|'.join(str(s) for s in steps)},secs={secs}"


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    try:
        with running_cluster(cpus_per_node=4) as cluster:
            yield cluster
    except SlurmUnavailable as exc:
        # The tier is part of `make test`: a machine without the cluster scripts or Slurm fails it loudly unless
        # the user opts out, so a green run never means "the launcher was not tested" by accident.
        if os.environ.get("SSL_VIL_SKIP_SLURM") == "1":
            pytest.skip(f"{exc} (SSL_VIL_SKIP_SLURM=1)")
        pytest.fail(f"the Slurm test tier cannot run: {exc}. Set SSL_VIL_SKIP_SLURM=1 to skip it.", pytrace=False)


@pytest.fixture(scope="module")
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A private folder for shards and runs (pytest's basetemp rotation, shared by every pytest process of this
    user, could delete it while the jobs still run); removed after the module unless a test failed."""
    path = Path(tempfile.mkdtemp(prefix="ssl_vil_slurm_runs_", dir="/tmp"))
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)
    else:
        print(f"Slurm test runs kept in {path}")


@pytest.fixture(scope="module")
def shards(workdir: Path) -> Path:
    root = workdir / "digits_shards"
    procs = [subprocess.Popen([sys.executable, "-m", "ssl_vil.data.make_shards", "builtin:digits", str(root / split),
                               "--split", split, "--maxcount", "200"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for split in ("train", "val")]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    return root


def _submit_cli(slurm: SlurmCluster, args: list[str]) -> str:
    """``python cluster/submit.py ARGS`` in a subprocess; returns the job id it printed."""
    proc = subprocess.run([sys.executable, str(SUBMIT), *args], env=slurm.env, capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, f"submit failed:\n{proc.stdout}\n{proc.stderr}"
    match = re.search(r"submitted \w+ job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def _submit_in_process(slurm: SlurmCluster, args: list[str], fault: str | None) -> str:
    """The same launcher code in this process (saves a second torch/timm import per job while validating the
    config); sbatch passes this environment, the fault variable included, on to the job."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("SLURM_CONF", "PATH"):
            mp.setenv(key, slurm.env[key])
        if fault:
            mp.setenv("SSL_VIL_FAULT", fault)
            mp.setenv("PYTHONPATH", faultinject.pythonpath())  # the job's processes install the fault hooks
        else:
            mp.delenv("SSL_VIL_FAULT", raising=False)
        job = submit_cli.submit(submit_cli.prepare(args))
    return job.job_id


@pytest.fixture(scope="module")
def runs(slurm: SlurmCluster, shards: Path, workdir: Path) -> dict[str, dict[str, Any]]:
    """Submit the three training jobs at once (they fit side by side on the two 4-CPU nodes)."""
    root = workdir / "runs"

    def stretch_until_first_save(name: str) -> list[str]:
        # The sleep fault stretches a job only until its first save on a signal: the batch script runs again on
        # every requeue, and periodic checkpoints are off, so LATEST appears with that save.
        return ["--setup", f"if [ -e {root / name / 'checkpoints' / 'LATEST'} ]; then unset SSL_VIL_FAULT; fi"]

    common = ["--config", str(RECIPE), "--cpu", "--cpus-per-task", "1", "--max-num-timeout", "20"]
    specs = {
        # 30 min: submitit counts a signal as a time limit (not a preemption) after min(0.8·T, T - 10 min)
        "ref": (["--nodes", "2", "--gpus-per-node", "1", "--timeout-min", "30"], None),
        "preempt": (["--nodes", "2", "--gpus-per-node", "1", "--timeout-min", "30",
                     *stretch_until_first_save("preempt")], _sleep_fault(range(3, 9), 2.0)),
        # slurmctld checks limits every 30 s and signals at the first check with now >= end - delay - 30 s:
        # USR2 28-58 s after each start (after the start-up imports), the kill at a later check (>= 30 s after
        # the signal); 16 sleeps of 3.5 s keep a stretched run busy past 58 s
        "limit": (["--nodes", "1", "--gpus-per-node", "2", "--timeout-min", "1", "--signal-delay-s", "2",
                   *stretch_until_first_save("limit")], _sleep_fault(range(0, TOTAL_STEPS), 3.5)),
    }
    out = {}
    for name, (extra, fault) in specs.items():
        args = [*common, *extra, "--output-dir", str(root / name), *_train_overrides(shards)]
        out[name] = {"job_id": _submit_in_process(slurm, args, fault), "run_dir": root / name}
    return out


# -------------------------------------------------------------------------------------------------- helpers
def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def _last_step(run_dir: Path) -> int:
    steps = [r["step"] for r in _metrics(run_dir) if "event" not in r and "step" in r]
    return max(steps, default=0)


def _events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "slurm" / EVENTS_FILENAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _task_logs(run_dir: Path, job_id: str, suffix: str) -> list[str]:
    folder = run_dir / "slurm" / job_id
    return [p.read_text(errors="replace") for p in sorted(folder.glob(f"{job_id}_*_log.{suffix}"))]


def _assert_completed(slurm: SlurmCluster, run: dict[str, Any], timeout_s: float) -> dict[str, str]:
    info = slurm.wait_finished(run["job_id"], timeout_s)
    if info.get("JobState") != "COMPLETED":
        logs = "\n".join(_task_logs(run["run_dir"], run["job_id"], "err"))[-6000:]
        pytest.fail(f"job {run['job_id']} ended {info.get('JobState')} ({info.get('Reason')}):\n{logs}")
    assert info["ExitCode"] == "0:0"
    return info


def _signal_masks(job_id: str) -> dict[str, list[tuple[int, int, int]]]:
    """``{"tasks": [(pid, caught, ignored)], "workers": [...]}`` for this job's Python processes (all "nodes" share
    this machine): tasks are children of slurmstepd, DataLoader workers are children of a task. ``caught`` and
    ``ignored`` are the SigCgt / SigIgn bit masks of /proc/PID/status."""
    procs: dict[int, dict[str, Any]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
            status = dict(line.split(":\t", 1) for line in (entry / "status").read_text().splitlines()
                          if ":\t" in line)
        except (OSError, ValueError):
            continue
        # srun's command line names the same module; only Python processes count
        if (f"SLURM_JOB_ID={job_id}".encode() in environ and b"submitit.core._submit" in cmdline
                and status["Name"] != "srun"):
            procs[int(entry.name)] = {"ppid": int(status["PPid"]), "caught": int(status["SigCgt"], 16),
                                      "ignored": int(status["SigIgn"], 16)}
    tasks = [p for p, v in procs.items() if v["ppid"] not in procs]
    workers = [p for p, v in procs.items() if v["ppid"] in procs]
    row = lambda p: (p, procs[p]["caught"], procs[p]["ignored"])  # noqa: E731
    return {"tasks": [row(p) for p in tasks], "workers": [row(p) for p in workers]}


def _payload(run_dir: Path, step: int) -> dict[str, Any]:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == step
    return {name: torch.load(folder / name, map_location="cpu", weights_only=True) for name in manifest["files"]}


def _assert_bitwise_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                           b.reshape(-1).contiguous().view(torch.uint8)), f"tensor differs at {path}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"keys differ at {path}: {set(a) ^ set(b)}"
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"value differs at {path}: {a!r} != {b!r}"


def _assert_same_final_state(run_dir: Path, ref_dir: Path) -> None:
    """Final checkpoint payload (objective, optimizer, data cursor, guards, every rank's RNG states) and exported
    weights bitwise equal."""
    _assert_bitwise_equal(_payload(run_dir, TOTAL_STEPS), _payload(ref_dir, TOTAL_STEPS))
    exported, reference = (load_file(d / "export" / "teacher_backbone.safetensors") for d in (run_dir, ref_dir))
    assert len(reference) > 0
    _assert_bitwise_equal(exported, reference)


def _assert_resumed_where_it_stopped(run_dir: Path, restarts: int) -> list[int]:
    """Each 'resumed' event of the trainer is at the step of the last 'preempted' save before it (no step lost or
    redone), and the launcher recorded those steps when it requeued. Returns the resume steps.

    A signal that lands while the trainer's handler is not installed (start-up, final export) is handled by
    submitit's handler directly: that run saved nothing new, and the next one resumes from the same step again
    (after the final export: from the final step, and only exports again)."""
    trainer_events = [(r["event"], r["step"]) for r in _metrics(run_dir) if r.get("event") in ("preempted", "resumed")]
    last_stop, resumes = None, []
    for kind, step in trainer_events:
        if kind == "preempted":
            last_stop = step
        else:
            assert step in (last_stop, TOTAL_STEPS), trainer_events
            resumes.append(step)
    assert resumes, trainer_events
    launcher = [e for e in _events(run_dir) if e["event"] == "checkpoint"]
    assert len(launcher) == restarts, launcher
    assert {e["resume_step"] for e in launcher if e["resume_step"] is not None} == set(resumes), (launcher, resumes)
    steps = [r["step"] for r in _metrics(run_dir) if "event" not in r]
    assert steps == list(range(1, TOTAL_STEPS + 1)), steps
    return resumes


# ---------------------------------------------------------------------------------------------------- tests
def test_preempted_two_node_run_resumes_bitwise(slurm: SlurmCluster, runs: dict[str, dict[str, Any]]) -> None:
    run = runs["preempt"]
    deadline = time.monotonic() + 240
    while _last_step(run["run_dir"]) < 3:
        assert time.monotonic() < deadline, f"no progress:\n{slurm.job_info(run['job_id'])}"
        assert slurm.job_info(run["job_id"]).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    # Slurm signals every process of the step: the training processes handle USR2 (the trainer's flag), their
    # DataLoader workers ignore it (otherwise they would die and take their rank down before it saves)
    usr2 = 1 << (signal.SIGUSR2 - 1)
    masks = _signal_masks(run["job_id"])
    assert len(masks["tasks"]) == 2 and len(masks["workers"]) >= 2, masks
    assert all(caught & usr2 for _, caught, _ in masks["tasks"]), masks
    assert all(ignored & usr2 for _, _, ignored in masks["workers"]), masks
    step_at_signal = _last_step(run["run_dir"])
    slurm.run("scancel", "--signal=USR2", run["job_id"])
    info = _assert_completed(slurm, run, 300)
    assert int(info["Restarts"]) == 1
    resumes = _assert_resumed_where_it_stopped(run["run_dir"], 1)
    assert len(resumes) == 1 and step_at_signal <= resumes[0] < TOTAL_STEPS, (step_at_signal, resumes)
    # only the preemption save and the final save exist: the resume came from the save made on the signal
    assert sorted(p.name for p in (run["run_dir"] / "checkpoints").glob("step_*")) == [
        f"step_{resumes[0]:08d}", f"step_{TOTAL_STEPS:08d}"]
    err = "\n".join(_task_logs(run["run_dir"], run["job_id"], "err"))
    assert "this job is preempted" in err
    ref = runs["ref"]
    _assert_completed(slurm, ref, 300)
    _assert_same_final_state(run["run_dir"], ref["run_dir"])


def test_reference_run_spans_two_nodes(slurm: SlurmCluster, runs: dict[str, dict[str, Any]]) -> None:
    run = runs["ref"]
    info = _assert_completed(slurm, run, 300)
    assert info["Restarts"] == "0" and info["NumNodes"] == "2" and info["NumTasks"] == "2"
    out = "\n".join(_task_logs(run["run_dir"], run["job_id"], "out"))
    assert "rank 0/2 (node 0/2, local 0)" in out and "rank 1/2 (node 1/2, local 0)" in out
    assert _last_step(run["run_dir"]) == TOTAL_STEPS
    assert (run["run_dir"] / "export" / "teacher_backbone.safetensors").is_file()
    assert [e["event"] for e in _events(run["run_dir"])] == ["start", "finished"]


def test_time_limit_requeues_one_node_two_task_run(slurm: SlurmCluster, runs: dict[str, dict[str, Any]]) -> None:
    run = runs["limit"]
    info = _assert_completed(slurm, run, 420)
    assert int(info["Restarts"]) >= 1 and info["NumNodes"] == "1" and info["NumTasks"] == "2"
    out = "\n".join(_task_logs(run["run_dir"], run["job_id"], "out"))
    assert "rank 0/2 (node 0/1, local 0)" in out and "rank 1/2 (node 0/1, local 1)" in out
    err = "\n".join(_task_logs(run["run_dir"], run["job_id"], "err"))
    assert "this job is timed-out" in err
    _assert_resumed_where_it_stopped(run["run_dir"], int(info["Restarts"]))
    _assert_completed(slurm, runs["ref"], 300)
    _assert_same_final_state(run["run_dir"], runs["ref"]["run_dir"])


def test_knn_eval_job_through_the_launcher(slurm: SlurmCluster, runs: dict[str, dict[str, Any]],
                                           shards: Path) -> None:
    ref = runs["ref"]
    _assert_completed(slurm, ref, 300)
    out_dir = ref["run_dir"] / "knn"
    job_id = _submit_cli(slurm, ["--entry", "knn", "--output-dir", str(out_dir), "--nodes", "1", "--gpus-per-node", "1",
                           "--cpu", "--cpus-per-task", "1", "--timeout-min", "10", "--",
                           "--weights", str(ref["run_dir"]), "--train-data", str(shards / "train"),
                           "--val-data", str(shards / "val"), "--k", "5", "10", "--device", "cpu",
                           "--num-workers", "0", "--batch-size", "256", "--output-dir", str(out_dir)])
    run = {"job_id": job_id, "run_dir": out_dir}
    _assert_completed(slurm, run, 300)
    results = json.loads((out_dir / "results_knn.json").read_text())
    assert (results["n_train"], results["n_val"]) == (1297, 500)
    assert [r["k"] for r in results["results"]] == [5, 10]
    assert all(0.0 <= r["top1"] <= r["top5"] <= 100.0 for r in results["results"])  # percent
    assert results["weights_source"] == str(ref["run_dir"] / "checkpoints" / f"step_{TOTAL_STEPS:08d}")
    assert [e["event"] for e in _events(out_dir)] == ["start", "finished"]
