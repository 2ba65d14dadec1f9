"""Hash verification on load: corrupt newest checkpoint -> logged error naming file and sha256, fallback."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_vil.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointVerificationError,
    latest_checkpoint,
    verify_step_dir,
)
from ssl_vil.checkpoint.manifest import build_manifest, encode_manifest
from ssl_vil.checkpoint.payload import serialize


def step_payload(step: int) -> dict:
    """Distinct, recognisable content per step, so a load from the wrong step cannot pass."""
    g = torch.Generator().manual_seed(step)
    return {
        "student": {"w": torch.randn(32, 8, generator=g), "b": torch.full((8,), float(step))},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(32, 8, generator=g)}}, "param_groups": [{"lr": 0.1}]},
        "progress": {"step": step, "tag": f"step-{step}"},
    }


def assert_payload_is(loaded_payload: dict, step: int) -> None:
    expected = step_payload(step)
    assert list(loaded_payload) == sorted(expected)
    assert torch.equal(loaded_payload["student"]["w"], expected["student"]["w"])
    assert torch.equal(loaded_payload["student"]["b"], expected["student"]["b"])
    assert torch.equal(
        loaded_payload["optimizer"]["state"][0]["exp_avg"], expected["optimizer"]["state"][0]["exp_avg"]
    )
    assert loaded_payload["progress"] == expected["progress"]


def manager_for(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(run_dir, keep_last=3, keep_every_steps=None, config_hash="h", world_size=1, git_sha=None)


@pytest.fixture
def three_checkpoints(tmp_path) -> Path:
    manager = manager_for(tmp_path)
    for step in (5, 10, 15):
        manager.save(step, step_payload(step))
    return tmp_path / "checkpoints"


def manifest_of(step_dir: Path) -> dict:
    return json.loads((step_dir / "manifest.json").read_text())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped_byte", "truncated"])
def test_damaged_payload_file_is_named_with_both_hashes_and_previous_step_loads(three_checkpoints, caplog, damage):
    newest = three_checkpoints / "step_00000015"
    target = newest / "student.pt"
    expected_sha = manifest_of(newest)["files"]["student.pt"]["sha256"]
    damage(target)
    actual_sha = hashlib.sha256(target.read_bytes()).hexdigest()
    assert actual_sha != expected_sha

    manager = manager_for(three_checkpoints.parent)
    with caplog.at_level(logging.ERROR, logger="ssl_vil.checkpoint"):
        loaded = manager.load_latest()
    assert loaded.step == 10 and loaded.path == three_checkpoints / "step_00000010"
    assert_payload_is(loaded.payload, 10)
    assert manager.fallbacks == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert str(target) in errors[0]
    assert f"expected sha256 {expected_sha}" in errors[0]
    assert f"actual sha256 {actual_sha}" in errors[0]
    assert latest_checkpoint(three_checkpoints.parent) == three_checkpoints / "step_00000010"


def delete_manifest(step_dir: Path) -> str:
    (step_dir / "manifest.json").unlink()
    return "manifest is missing"


def garble_manifest(step_dir: Path) -> str:
    (step_dir / "manifest.json").write_bytes(b'{"step": 15, "files": {"stu')
    return "manifest is not valid JSON"


def edit_manifest(step_dir: Path) -> str:
    # Valid JSON with a plausible value: only the manifest's self-hash can tell.
    manifest = manifest_of(step_dir)
    manifest["world_size"] = 3
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    return f"manifest was altered: expected sha256 {manifest['manifest_sha256']}, actual sha256 "


def delete_payload_file(step_dir: Path) -> str:
    sha = manifest_of(step_dir)["files"]["optimizer.pt"]["sha256"]
    (step_dir / "optimizer.pt").unlink()
    return (
        f"{step_dir / 'optimizer.pt'}: file listed in the manifest cannot be read (No such file or directory); "
        f"expected sha256 {sha}"
    )


@pytest.mark.parametrize("damage", [delete_manifest, garble_manifest, edit_manifest, delete_payload_file])
def test_broken_manifest_or_missing_file_falls_back(three_checkpoints, caplog, damage):
    newest = three_checkpoints / "step_00000015"
    fragment = damage(newest)
    manager = manager_for(three_checkpoints.parent)
    with caplog.at_level(logging.ERROR, logger="ssl_vil.checkpoint"):
        loaded = manager.load_latest()
    assert loaded.step == 10
    assert_payload_is(loaded.payload, 10)
    assert manager.fallbacks == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "step_00000015" in errors[0] and fragment in errors[0]
    with pytest.raises(CheckpointVerificationError, match="step_00000015"):
        verify_step_dir(newest)


def test_fallback_walks_past_several_corrupt_folders(three_checkpoints):
    flip_byte(three_checkpoints / "step_00000015" / "progress.pt")
    (three_checkpoints / "step_00000010" / "manifest.json").unlink()
    manager = manager_for(three_checkpoints.parent)
    loaded = manager.load_latest()
    assert loaded.step == 5
    assert_payload_is(loaded.payload, 5)
    assert manager.fallbacks == 2


def test_all_corrupt_raises_instead_of_restarting_from_scratch(three_checkpoints):
    for step_dir in three_checkpoints.glob("step_*"):
        flip_byte(step_dir / "student.pt")
    manager = manager_for(three_checkpoints.parent)
    with pytest.raises(CheckpointVerificationError, match="no checkpoint under .* passes verification") as info:
        manager.load_latest()
    for name in ("step_00000005", "step_00000010", "step_00000015"):
        assert f"{name}/student.pt" in str(info.value)
    assert manager.fallbacks == 3
    with pytest.raises(CheckpointVerificationError):
        latest_checkpoint(three_checkpoints.parent)


def test_latest_checkpoint_ignores_temp_folders_strays_and_corrupt_newest(three_checkpoints):
    # A complete-looking copy under a temp name (a save killed before its rename) must never be chosen,
    # nor anything that is not a step folder.
    shutil.copytree(three_checkpoints / "step_00000015", three_checkpoints / ".tmp-step_00000099-4242")
    (three_checkpoints / "step_00000077").write_text("a file, not a folder")
    (three_checkpoints / "step_abc").mkdir()
    assert latest_checkpoint(three_checkpoints.parent) == three_checkpoints / "step_00000015"
    truncate(three_checkpoints / "step_00000015" / "optimizer.pt")
    assert latest_checkpoint(three_checkpoints.parent) == three_checkpoints / "step_00000010"
    # The next save sweeps the temp folder away.
    manager_for(three_checkpoints.parent).save(20, step_payload(20))
    assert not any(p.name.startswith(".tmp-") for p in three_checkpoints.iterdir())


def test_latest_pointer_to_missing_folder_is_only_a_hint(three_checkpoints, caplog):
    (three_checkpoints / "LATEST").write_text("step_00000099\n")
    with caplog.at_level(logging.WARNING, logger="ssl_vil.checkpoint"):
        loaded = manager_for(three_checkpoints.parent).load_latest()
    assert loaded.step == 15
    assert any("'step_00000099'" in r.getMessage() for r in caplog.records)


def test_verified_file_that_weights_only_load_refuses_raises_checkpoint_error(tmp_path):
    # Bypass the save-time check to plant a file that hashes correctly but is not weights_only-safe.
    step_dir = tmp_path / "checkpoints" / "step_00000001"
    step_dir.mkdir(parents=True)
    data = serialize({"rng": np.arange(3)})
    (step_dir / "rng.pt").write_bytes(data)
    manifest = build_manifest(
        step=1, config_hash="h", git_sha=None, world_size=1,
        files={"rng.pt": (hashlib.sha256(data).hexdigest(), len(data))}, metadata={},
    )  # fmt: skip
    (step_dir / "manifest.json").write_bytes(encode_manifest(manifest))
    # The hashes are fine, yet neither the trainer nor the launcher's resume point takes the folder.
    with pytest.raises(CheckpointError, match=r"rng\.pt matches its manifest but torch\.load\(weights_only=True\)"):
        manager_for(tmp_path).load_latest()
    with pytest.raises(CheckpointError, match=r"rng\.pt matches its manifest"):
        latest_checkpoint(tmp_path)


def test_resume_point_skips_a_hashed_but_unloadable_newest_step_like_the_trainer(three_checkpoints):
    newest = three_checkpoints / "step_00000015"
    data = serialize({"rng": np.arange(3)})
    (newest / "rng.pt").write_bytes(data)
    old = json.loads((newest / "manifest.json").read_text())
    files = {name: (f["sha256"], f["size_bytes"]) for name, f in old["files"].items()}
    files["rng.pt"] = (hashlib.sha256(data).hexdigest(), len(data))
    manifest = build_manifest(step=15, config_hash=old["config_hash"], git_sha=old["git_sha"],
                              world_size=old["world_size"], files=files, metadata=old["metadata"])
    (newest / "manifest.json").write_bytes(encode_manifest(manifest))
    loaded = manager_for(three_checkpoints.parent).load_latest()
    assert loaded.step == 10
    assert latest_checkpoint(three_checkpoints.parent) == three_checkpoints / "step_00000010" == loaded.path


def test_load_folder_loads_a_chosen_step_and_refuses_a_corrupt_one(three_checkpoints):
    loaded = CheckpointManager.load_folder(three_checkpoints / "step_00000010")
    assert loaded.step == 10 and loaded.manifest["step"] == 10
    assert_payload_is(loaded.payload, 10)
    target = three_checkpoints / "step_00000005" / "progress.pt"
    flip_byte(target)
    with pytest.raises(CheckpointVerificationError, match=f"{target}: content does not match the manifest"):
        CheckpointManager.load_folder(three_checkpoints / "step_00000005")
