"""Retention (keep-last-N valid + keep-every), failed purges, full disk, replaced and abandoned steps."""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch

import ssl_vil.checkpoint.manager as manager_module
from ssl_vil.checkpoint import CheckpointManager, CheckpointWriteError, latest_checkpoint
from ssl_vil.checkpoint.retention import plan_retention


def step_payload(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "student": {"w": torch.randn(16, 4, generator=g)},
        "teacher": {"w": torch.randn(16, 4, generator=g)},
        "progress": {"step": step},
    }


def make_manager(run_dir: Path, keep_last: int = 3, keep_every_steps: int | None = 10) -> CheckpointManager:
    return CheckpointManager(
        run_dir, keep_last=keep_last, keep_every_steps=keep_every_steps, config_hash="h", world_size=1, git_sha=None
    )


def step_dirs(run_dir: Path) -> set[int]:
    return {int(p.name[len("step_") :]) for p in (run_dir / "checkpoints").glob("step_*")}


def temp_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-"))


def folder_digest(step_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(step_dir.iterdir())}


def test_twelve_saves_keep_last_three_and_every_tenth(tmp_path):
    manager = make_manager(tmp_path)
    saved: list[int] = []
    for step in range(5, 65, 5):  # 12 saves: 5, 10, ..., 60
        manager.save(step, step_payload(step))
        saved.append(step)
        expected = set(saved[-3:]) | {s for s in saved if s % 10 == 0}  # naive reference of the rule
        assert step_dirs(tmp_path) == expected, f"after saving step {step}"
        assert temp_entries(tmp_path) == []
        assert (tmp_path / "checkpoints" / "LATEST").read_text() == f"step_{step:08d}\n"
    assert step_dirs(tmp_path) == {10, 20, 30, 40, 50, 55, 60}
    loaded = make_manager(tmp_path).load_latest()
    assert loaded.step == 60
    assert torch.equal(loaded.payload["teacher"]["w"], step_payload(60)["teacher"]["w"])


def test_without_keep_every_only_the_last_n_remain(tmp_path):
    manager = make_manager(tmp_path, keep_last=2, keep_every_steps=None)
    for step in range(1, 7):
        manager.save(step, step_payload(step))
    assert step_dirs(tmp_path) == {5, 6}


def test_plan_retention_rules():
    asked: list[int] = []

    def is_valid(step: int) -> bool:
        asked.append(step)
        return step != 40  # 40 is corrupt

    doomed = plan_retention(
        [10, 20, 25, 30, 35, 40, 45, 50, 70], current_step=50, keep_last=3, keep_every_steps=20, is_valid=is_valid
    )
    # 70: abandoned timeline; 40: corrupt but permanent (multiple of 20) so kept; last 3 valid = 50, 45, 35.
    assert doomed == {
        70: "newer than the step just saved (50); left by an abandoned run timeline",
        30: "older than the newest 3 valid checkpoints",
        25: "older than the newest 3 valid checkpoints",
        10: "older than the newest 3 valid checkpoints",
    }
    assert asked == [50, 45, 40, 35]  # newest first, and never older than needed
    doomed = plan_retention([1, 2, 3], current_step=3, keep_last=2, keep_every_steps=None, is_valid=lambda s: s != 2)
    assert doomed == {2: "fails verification"}
    with pytest.raises(ValueError, match="keep_last"):
        plan_retention([1], current_step=1, keep_last=0, keep_every_steps=None, is_valid=lambda s: True)


def test_corrupt_older_checkpoint_does_not_count_towards_keep_last(tmp_path):
    manager = make_manager(tmp_path, keep_last=2, keep_every_steps=None)
    manager.save(1, step_payload(1))
    manager.save(2, step_payload(2))
    student = tmp_path / "checkpoints" / "step_00000002" / "student.pt"
    student.write_bytes(student.read_bytes()[:-1])
    manager.save(3, step_payload(3))
    # step 2 fails verification, so step 1 is still one of the two newest *valid* checkpoints.
    assert step_dirs(tmp_path) == {1, 3}


def test_failed_purge_is_logged_save_succeeds_and_next_save_cleans_up(tmp_path, monkeypatch, caplog):
    manager = make_manager(tmp_path, keep_last=2, keep_every_steps=None)
    manager.save(1, step_payload(1))
    manager.save(2, step_payload(2))
    real_rmtree = shutil.rmtree
    failures = []

    def rmtree_failing_once(path, *args, **kwargs):
        if not failures:
            failures.append(Path(path).name)
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_failing_once)
    with caplog.at_level(logging.WARNING, logger="ssl_vil.checkpoint"):
        path = manager.save(3, step_payload(3))
    assert failures == [f".tmp-purge-step_00000001-{__import__('os').getpid()}"]
    assert any("could not remove" in r.getMessage() and "Permission denied" in r.getMessage() for r in caplog.records)
    assert path.name == "step_00000003" and latest_checkpoint(tmp_path) == path
    assert step_dirs(tmp_path) == {2, 3}  # the doomed folder lost its final name before deletion was tried
    assert temp_entries(tmp_path) == failures
    manager.save(4, step_payload(4))
    assert step_dirs(tmp_path) == {3, 4}
    assert temp_entries(tmp_path) == []


def _assert_previous_intact(run_dir: Path, before: dict[str, str], message: str) -> None:
    assert "no space" in message
    assert "step_00000010 is intact" in message
    assert temp_entries(run_dir) == []
    assert step_dirs(run_dir) == {5, 10}
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "step_00000010\n"
    assert folder_digest(run_dir / "checkpoints" / "step_00000010") == before
    manager = make_manager(run_dir)
    loaded = manager.load_latest()
    assert loaded.step == 10 and manager.fallbacks == 0
    assert torch.equal(loaded.payload["student"]["w"], step_payload(10)["student"]["w"])


@pytest.fixture
def two_saves(tmp_path) -> tuple[CheckpointManager, dict[str, str]]:
    manager = make_manager(tmp_path)
    manager.save(5, step_payload(5))
    manager.save(10, step_payload(10))
    return manager, folder_digest(tmp_path / "checkpoints" / "step_00000010")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("failing_call", [2, 4], ids=["second_payload_file", "manifest"])
def test_full_disk_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, two_saves, code, failing_call):
    manager, before = two_saves
    real_write = manager_module.write_file_durably
    calls = []

    def write_until_disk_full(path, data, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == failing_call:
            Path(path).write_bytes(bytes(data)[:7])  # a partial file really lands on disk
            raise OSError(code, "No space left on device", str(path))
        return real_write(path, data, **kwargs)

    monkeypatch.setattr(manager_module, "write_file_durably", write_until_disk_full)
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(15, step_payload(15))
    assert calls[-1] == ("manifest.json" if failing_call == 4 else "teacher.pt")
    _assert_previous_intact(tmp_path, before, str(info.value))


def test_enospc_fault_injection_keeps_previous_checkpoint(tmp_path, monkeypatch, two_saves, fault_injection):
    manager, before = two_saves
    monkeypatch.setenv("SSL_VIL_FAULT", "ckpt_write:step=15,enospc=1")
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(15, step_payload(15))
    _assert_previous_intact(tmp_path, before, str(info.value))
    manager.save(20, step_payload(20))  # the fault names step 15 only
    assert latest_checkpoint(tmp_path).name == "step_00000020"


def test_other_io_error_is_reported_without_no_space(tmp_path, monkeypatch, two_saves):
    manager, _ = two_saves

    def failing_rename(src, dst):
        raise OSError(errno.EIO, "Input/output error", str(src))

    monkeypatch.setattr(manager_module.os, "rename", failing_rename)
    with pytest.raises(CheckpointWriteError, match="Input/output error") as info:
        manager.save(15, step_payload(15))
    monkeypatch.undo()
    assert "no space" not in str(info.value)
    assert temp_entries(tmp_path) == [] and step_dirs(tmp_path) == {5, 10}


def test_saving_an_existing_step_replaces_it(tmp_path):
    manager = make_manager(tmp_path)
    manager.save(5, step_payload(5))
    manager.save(10, step_payload(10))
    manager.save(10, step_payload(11))  # same step, new content
    assert step_dirs(tmp_path) == {5, 10} and temp_entries(tmp_path) == []
    loaded = make_manager(tmp_path).load_latest()
    assert loaded.step == 10
    assert torch.equal(loaded.payload["student"]["w"], step_payload(11)["student"]["w"])


def test_resuming_from_an_older_step_drops_the_abandoned_newer_ones(tmp_path):
    manager = make_manager(tmp_path, keep_last=5, keep_every_steps=10)
    for step in (5, 10, 15, 20):
        manager.save(step, step_payload(step))
    # A run restarted from step 10 (say, on purpose) saves step 15 again: 20, though a multiple of 10, is
    # from the abandoned timeline and would otherwise win "newest verified" on the next restart.
    resumed = make_manager(tmp_path, keep_last=5, keep_every_steps=10)
    resumed.save(15, step_payload(115))
    assert step_dirs(tmp_path) == {5, 10, 15}
    assert latest_checkpoint(tmp_path).name == "step_00000015"
    assert torch.equal(resumed.load_latest().payload["student"]["w"], step_payload(115)["student"]["w"])
