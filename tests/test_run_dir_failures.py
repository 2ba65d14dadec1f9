"""Run-dir and checkpoint failures end in one clear line and lose nothing (real trainer processes, real files).

Every refusal is checked three ways: exit code 2, one message line on stderr naming the problem and no traceback,
and the output dir byte-for-byte as it was (or still absent). Each case then checks that the corrected command runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_vil.checkpoint import CheckpointManager, latest_checkpoint
from ssl_vil.checkpoint.manifest import _self_hash, encode_manifest
from ssl_vil.checkpoint.payload import serialize
from ssl_vil.config.load import describe_resume_mutable_keys
from trainer_harness import RECIPE, ROOT, assert_tree_equal, final_payload, records, tiny_overrides, write_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 4
STEP_DIRS = ["step_00000002", "step_00000004"]


def overrides_for(shards: Path, **changes: object) -> list[str]:
    base = tiny_overrides(shards, total_steps=STEPS, workers=0) + ["checkpoint.every_steps=2",
                                                                    "logging.log_every_steps=1"]
    return base + [f"{k}={v}" for k, v in changes.items()]


def train(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID")}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.run(
        [sys.executable, "-m", "ssl_vil.train", "--config", str(RECIPE), "--output-dir", str(run_dir), *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def snapshot(path: Path) -> dict[str, bytes | None] | None:
    """Every entry under ``path``: relative name -> file bytes (None for a folder); None when ``path`` is absent."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": path.read_bytes()}
    out: dict[str, bytes | None] = {}
    for p in sorted(path.rglob("*")):
        out[str(p.relative_to(path))] = None if p.is_dir() else p.read_bytes()
    return out


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, the last stderr line is the refusal (containing ``fragments``), and no traceback anywhere."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4; tests work on copies of it."""
    root = tmp_path_factory.mktemp("rundir")
    write_shards(root / "shards")
    run = root / "base"
    proc = train(run, overrides_for(root / "shards"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", *STEP_DIRS]
    return root, run


def copy_run(base, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base[1], run)
    return run


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_all_checkpoints_corrupt_is_one_line_refusal_and_touches_nothing(base, tmp_path):
    root, _ = base
    run = copy_run(base, tmp_path)
    for name in STEP_DIRS:
        flip_byte(run / "checkpoints" / name / "objective.pt")
    before = snapshot(run)
    proc = train(run, overrides_for(root / "shards"))
    line = assert_refused(proc, f"error: cannot resume {run}", "no checkpoint under", "passes verification",
                          f"{STEP_DIRS[0]}/objective.pt", f"{STEP_DIRS[1]}/objective.pt")
    assert "content does not match the manifest" in line
    assert snapshot(run) == before


def _plant_unloadable_but_hashed(step_dir: Path) -> None:
    """Replace train_state.pt by a file torch.load(weights_only=True) refuses, and re-hash it in the manifest."""
    data = bytes(serialize({"rng": np.arange(3)}))
    (step_dir / "train_state.pt").write_bytes(data)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["train_state.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
    manifest["manifest_sha256"] = _self_hash(manifest)
    (step_dir / "manifest.json").write_bytes(encode_manifest(manifest))


def test_unloadable_but_hashed_payload_falls_back_to_previous_step(base, tmp_path):
    root, ref = base
    run = copy_run(base, tmp_path)
    _plant_unloadable_but_hashed(run / "checkpoints" / STEP_DIRS[1])
    # The hashes are fine, but the launcher's resume point is the step the trainer will resume from.
    assert latest_checkpoint(run) == run / "checkpoints" / STEP_DIRS[0]
    proc = train(run, overrides_for(root / "shards"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"checkpoint {STEP_DIRS[1]} cannot be loaded, trying the previous one" in proc.stderr
    assert "Unsupported global" in proc.stderr  # why it was skipped
    assert "weights_only=False" not in proc.stderr and "set to `False`" not in proc.stderr
    resumed = [r for r in records(run) if r.get("event") == "resumed"]
    assert [(r["step"], r["fallbacks"]) for r in resumed] == [(2, 1)]
    # Steps 3-4 recomputed from step 2 equal the uninterrupted run bitwise.
    a, b = final_payload(ref), final_payload(run)
    for name in ("objective", "optimizer", "train_state"):
        assert_tree_equal(a[name], b[name], name)


@pytest.mark.parametrize(("change", "expected"), [
    ({"optim.lr": 1e-3}, "optim.lr: run has 0.002, now 0.001"),
    ({"model.dim": 96}, "model.dim: run has 64, now 96"),
])
def test_lost_config_yaml_the_checkpoint_record_decides(base, tmp_path, change, expected):
    root, _ = base
    run = copy_run(base, tmp_path)
    (run / "config.yaml").unlink()
    before = snapshot(run)
    proc = train(run, overrides_for(root / "shards", **change))
    assert_refused(proc, "config error:", f"{run}: existing run has an incompatible config",
                          f"recorded in checkpoints/{STEP_DIRS[1]}/manifest.json", f"these keys differ: {expected}",
                          f"keys allowed to change on resume: {describe_resume_mutable_keys()}.")
    assert "size mismatch" not in proc.stderr and snapshot(run) == before
    # A change in a key allowed on resume (extend the run) goes through, and config.yaml is written again.
    proc = train(run, overrides_for(root / "shards", **{"schedule.total_steps": STEPS + 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in records(run) if r.get("event") == "resumed"] == [STEPS]
    assert (run / "config.yaml").exists() and (run / "checkpoints" / f"step_{STEPS + 2:08d}").is_dir()


FAILED_STARTS = {
    "missing_data": ({"data.train": "/nonexistent/shards"}, "1 shard file(s) do not exist"),
    "file_as_data_dir": ({"data.train": "{root}/notes.txt"}, "cannot count the records of"),
    "too_many_workers": ({"data.num_workers": 8}, "fewer shards than workers"),
    "cuda_without_cuda": ({"train.device": "cuda"}, "train.device: got 'cuda', but CUDA is not available"),
    "knn_monitor_data_missing": ({"knn_monitor.every_steps": 2, "knn_monitor.train": "{root}/shards",
                                  "knn_monitor.val": "/nonexistent/val"}, "/nonexistent/val"),
}


@pytest.mark.parametrize("case", list(FAILED_STARTS))
def test_failed_start_writes_nothing_and_the_corrected_command_runs(base, tmp_path, case):
    root, _ = base
    (root / "notes.txt").write_text("not a shard\n")
    change, fragment = FAILED_STARTS[case]
    if case == "cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    change = {k: str(v).format(root=root) for k, v in change.items()}
    run = tmp_path / "fresh" / "run"
    proc = train(run, overrides_for(root / "shards", **change))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "config error:" in proc.stderr and fragment in proc.stderr
    assert not (tmp_path / "fresh").exists()  # not even the parent the run would have been created in
    proc = train(run, overrides_for(root / "shards"))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_failed_resume_with_moved_data_leaves_run_dir_byte_identical(base, tmp_path):
    root, ref = base
    run = copy_run(base, tmp_path)
    before = snapshot(run)
    proc = train(run, overrides_for(root / "shards", **{"data.train": "/moved/away", "schedule.total_steps": 6}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert snapshot(run) == before
    # data.train may change on resume: the data at its new place is accepted.
    moved = tmp_path / "moved"
    shutil.copytree(root / "shards", moved)
    proc = train(run, overrides_for(moved, **{"schedule.total_steps": 6}))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_output_dir_under_a_file_is_refused_and_the_file_untouched(base, tmp_path):
    root, _ = base
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"keep me")
    proc = train(blocker / "run", overrides_for(root / "shards"))
    assert_refused(proc, f"error: --output-dir {blocker / 'run'}: cannot be created, {blocker} is not a directory")
    assert blocker.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    proc = train(tmp_path / "run", overrides_for(root / "shards"))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_empty_step_folder_is_removed_once_with_a_warning(base, tmp_path):
    root, _ = base
    run = copy_run(base, tmp_path)
    empty = run / "checkpoints" / "step_00000099"
    empty.mkdir()
    proc = train(run, overrides_for(root / "shards", **{"schedule.total_steps": 6}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed the empty checkpoint folder {empty}" in proc.stderr
    assert " ERROR " not in proc.stderr
    assert not empty.exists()
    assert [r["step"] for r in records(run) if r.get("event") == "resumed"] == [STEPS]
    proc = train(run, overrides_for(root / "shards", **{"schedule.total_steps": 6}))
    assert proc.returncode == 0 and "step_00000099" not in proc.stderr, proc.stderr[-3000:]  # warned once only


# ------------------------------------------------------------------------------------------ in-process (fast)
def _manager(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(run_dir, keep_last=3, keep_every_steps=None, config_hash="h", world_size=1, git_sha=None)


@pytest.fixture
def two_saves(tmp_path) -> Path:
    manager = _manager(tmp_path)
    for step in (5, 10):
        manager.save(step, {"w": {"x": torch.full((4,), float(step))}})
    return tmp_path / "checkpoints"


@pytest.mark.parametrize(("latest", "note"), [
    (None, "LATEST is missing"),
    (b"\x00\xff\xfe garbage", "LATEST does not name a step folder (empty or not text)"),
    (b"", "LATEST does not name a step folder (empty or not text)"),
    (b"hello\n", "LATEST names 'hello'"),
])
def test_missing_or_garbage_latest_falls_back_to_scanning_with_a_named_warning(two_saves, caplog, latest, note):
    if latest is None:
        (two_saves / "LATEST").unlink()
    else:
        (two_saves / "LATEST").write_bytes(latest)
    with caplog.at_level(logging.WARNING, logger="ssl_vil.checkpoint"):
        loaded = _manager(two_saves.parent).load_latest()
    assert loaded.step == 10
    messages = [r.getMessage() for r in caplog.records]
    assert any(note in m and "using step_00000010" in m for m in messages), messages
    assert not any("None" in m for m in messages), messages


def test_empty_step_folder_is_skipped_without_error_and_only_empty_ones_are_removed(two_saves, caplog):
    (two_saves / "step_00000099").mkdir()
    stray = two_saves / "step_00000098"
    stray.mkdir()
    (stray / "notes.txt").write_text("not ours to delete")
    manager = _manager(two_saves.parent)
    with caplog.at_level(logging.WARNING, logger="ssl_vil.checkpoint"):
        loaded = manager.load_latest()
    assert loaded.step == 10 and manager.fallbacks == 1  # only the non-empty stray counts as a failed checkpoint
    assert any("step_00000099 is empty" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert manager.remove_empty_step_dirs() == [two_saves / "step_00000099"]
    assert sorted(p.name for p in two_saves.iterdir()) == ["LATEST", "step_00000005", "step_00000010",
                                                         "step_00000098"]
    assert (stray / "notes.txt").read_text() == "not ours to delete"


def test_only_empty_step_folders_mean_a_fresh_start(tmp_path):
    (tmp_path / "checkpoints" / "step_00000005").mkdir(parents=True)
    assert _manager(tmp_path).load_latest() is None
    assert latest_checkpoint(tmp_path) is None


def test_unloadable_payload_message_never_relays_weights_only_false(two_saves, caplog):
    step_dir = two_saves / "step_00000010"
    data = bytes(serialize({"rng": np.arange(3)}))
    (step_dir / "w.pt").write_bytes(data)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["w.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
    manifest["manifest_sha256"] = _self_hash(manifest)
    (step_dir / "manifest.json").write_bytes(encode_manifest(manifest))
    manager = _manager(two_saves.parent)
    with caplog.at_level(logging.ERROR, logger="ssl_vil.checkpoint"):
        loaded = manager.load_latest()
    assert loaded.step == 5 and manager.fallbacks == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    text = record.getMessage()
    assert "step_00000010 cannot be loaded, trying the previous one" in text
    assert "w.pt matches its manifest but torch.load(weights_only=True) fails: Unsupported global" in text
    assert "False" not in text and "\n" not in text
