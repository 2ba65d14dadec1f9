"""Checkpoint save/load round trip: bitwise equality, manifest contents, payload rules, RNG capture, ranks."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_vil.checkpoint import (
    FORMAT_VERSION,
    CheckpointManager,
    CheckpointWriteError,
    capture_rng_state,
    config_hash,
    latest_checkpoint,
    restore_rng_state,
)


def assert_bitwise_equal(expected, actual, where="payload"):
    """Deep equality with exact types, identical key order, and byte-identical tensors (NaN and -0.0 too)."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert actual.stride() == expected.stride(), where
        assert actual.device.type == "cpu", where
        a = expected.contiguous().reshape(-1).view(torch.uint8)
        b = actual.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), f"{where}: tensor bytes differ"
    elif isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_bitwise_equal(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_bitwise_equal(e, a, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert math.copysign(1, actual) == math.copysign(1, expected), where
        assert (math.isnan(expected) and math.isnan(actual)) or actual == expected, where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def make_manager(run_dir: Path, **overrides) -> CheckpointManager:
    kwargs = dict(keep_last=3, keep_every_steps=10, config_hash="cfg-hash", world_size=1, git_sha="abc123")
    kwargs.update(overrides)
    return CheckpointManager(run_dir, **kwargs)


def rich_payload() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).square().sum().backward()
    opt.step()
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45, 3.0])
    return {
        "student": model.state_dict(),
        "optimizer": opt.state_dict(),
        "tensors": {
            "half": torch.randn(3, 2).half(),
            "bf16": torch.randn(5).bfloat16(),
            "int64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
            "bool": torch.tensor([True, False, True]),
            "uint8": torch.arange(256, dtype=torch.uint8),
            "special_floats": special,
            "transposed_view": torch.arange(12.0).reshape(3, 4).t(),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
        },
        "state": {
            "step": 7,
            "loss": 0.1234567890123,
            "neg_zero": -0.0,
            "nan": float("nan"),
            "name": "run-α ✓",
            "nested": {"a": [1, 2.5, "x", None, True], "t": (1, "two", 3.0), 3: "int key"},
            "ordered": OrderedDict([("z", 1), ("a", 2)]),
            "shape": torch.Size([2, 3]),
            "dtype": torch.bfloat16,
            "blob": b"\x00\xffbytes",
            "c": complex(1.5, -2.0),
        },
    }


def test_round_trip_is_bitwise_and_manifest_is_complete(tmp_path):
    payload = rich_payload()
    manager = make_manager(tmp_path, world_size=4)
    before = datetime.now(timezone.utc)
    path = manager.save(7, payload, metadata={"data_cursor_format": 2})
    ckpt_dir = tmp_path / "checkpoints"
    assert path == ckpt_dir / "step_00000007"
    assert sorted(os.listdir(ckpt_dir)) == ["LATEST", "step_00000007"]
    assert (ckpt_dir / "LATEST").read_text() == "step_00000007\n"
    assert sorted(os.listdir(path)) == ["manifest.json", "optimizer.pt", "state.pt", "student.pt", "tensors.pt"]

    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest) == {
        "format_version", "step", "config_hash", "git_sha", "world_size", "created_utc", "metadata", "files",
        "manifest_sha256",
    }  # fmt: skip
    assert manifest["format_version"] == FORMAT_VERSION == 1
    assert manifest["step"] == 7
    assert manifest["config_hash"] == "cfg-hash"
    assert manifest["git_sha"] == "abc123"
    assert manifest["world_size"] == 4
    assert manifest["metadata"] == {"data_cursor_format": 2}
    created = datetime.fromisoformat(manifest["created_utc"])
    assert before - timedelta(seconds=1) <= created <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert list(manifest["files"]) == ["optimizer.pt", "state.pt", "student.pt", "tensors.pt"]
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert manifest["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()

    loaded = make_manager(tmp_path).load_latest()
    assert loaded is not None
    assert loaded.step == 7 and loaded.path == path and loaded.manifest == manifest
    assert list(loaded.payload) == ["optimizer", "state", "student", "tensors"]
    for name in payload:
        assert_bitwise_equal(payload[name], loaded.payload[name], name)
    assert latest_checkpoint(tmp_path) == path


def test_loaded_state_restores_modules_and_optimizer_exactly(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 5)
    model(x).sum().backward()
    opt.step()
    make_manager(tmp_path).save(1, {"model": model.state_dict(), "optimizer": opt.state_dict()})

    loaded = make_manager(tmp_path).load_latest()
    model2 = torch.nn.Linear(5, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    model2.load_state_dict(loaded.payload["model"])
    opt2.load_state_dict(loaded.payload["optimizer"])
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_empty_run_dir_has_no_checkpoint(tmp_path):
    assert make_manager(tmp_path).load_latest() is None
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "does-not-exist") is None


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"rng": {"numpy": np.zeros(3)}}, "payload['rng']['numpy'] is a numpy.ndarray"),
        ({"state": {"loss": np.float64(0.5)}}, "payload['state']['loss'] is a numpy.float64"),
        ({"state": [1, {"p": Path("/x")}]}, "payload['state'][1]['p'] is a pathlib"),
        ({"state": {np.int64(3): 1}}, "is a numpy.int64"),
    ],
)
def test_payload_that_weights_only_load_refuses_is_rejected_before_writing(tmp_path, payload, fragment):
    manager = make_manager(tmp_path)
    with pytest.raises(TypeError, match="weights_only") as info:
        manager.save(3, payload)
    assert fragment in str(info.value)
    assert not (tmp_path / "checkpoints").exists() or list((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("name", ["../escape", "", "a/b", ".hidden", "with space"])
def test_bad_entry_names_are_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="not a valid file stem"):
        make_manager(tmp_path).save(1, {name: {"x": 1}})


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_every_steps": 0}, "keep_every_steps"),
        ({"config_hash": ""}, "config_hash"),
        ({"world_size": 0}, "world_size"),
        ({"world_size": 2, "rank": 2}, "rank"),
    ],
)
def test_constructor_rejects_bad_arguments(tmp_path, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_manager(tmp_path, **kwargs)


def test_save_rejects_bad_step_metadata_and_fault_spec(tmp_path, monkeypatch, fault_injection):
    manager = make_manager(tmp_path)
    with pytest.raises(ValueError, match="step must be"):
        manager.save(-1, {"a": {}})
    with pytest.raises(TypeError, match="metadata must be plain JSON"):
        manager.save(1, {"a": {}}, metadata={"p": Path("/x")})
    monkeypatch.setenv("SSL_VIL_FAULT", "ckpt_write:step=2,kill_after_fractoin=0.5")
    with pytest.raises(ValueError, match="unknown keys \\['kill_after_fractoin'\\]"):
        manager.save(2, {"a": {}})


def test_non_zero_rank_writes_nothing_and_waits_at_the_barrier(tmp_path):
    calls = []
    manager = make_manager(tmp_path, world_size=2, rank=1, barrier=lambda: calls.append("barrier"))
    path = manager.save(5, {"model": {"w": torch.ones(2)}})
    assert path == tmp_path / "checkpoints" / "step_00000005"
    assert calls == ["barrier"]
    assert not (tmp_path / "checkpoints").exists()


def test_rank_zero_reaches_the_barrier_after_the_save_and_after_a_failure(tmp_path, monkeypatch, fault_injection):
    seen = []
    ckpt_dir = tmp_path / "checkpoints"
    manager = make_manager(
        tmp_path, world_size=2, rank=0, barrier=lambda: seen.append(latest_checkpoint(tmp_path) is not None)
    )
    manager.save(5, {"model": {"w": torch.ones(2)}})
    assert seen == [True]  # the folder was complete and verified when the other ranks were released
    monkeypatch.setenv("SSL_VIL_FAULT", "ckpt_write:step=6,enospc=1")
    with pytest.raises(CheckpointWriteError, match="no space"):
        manager.save(6, {"model": {"w": torch.ones(2)}})
    assert seen == [True, True]
    assert sorted(os.listdir(ckpt_dir)) == ["LATEST", "step_00000005"]


def test_config_hash_is_canonical():
    cfg = {"model": {"dim": 64, "depth": 2}, "optim": {"lr": 1e-3, "betas": (0.9, 0.95)}, "name": "x"}
    reordered = {"name": "x", "optim": {"betas": [0.9, 0.95], "lr": 0.001}, "model": {"depth": 2, "dim": 64}}
    assert config_hash(cfg) == config_hash(reordered)
    assert config_hash(cfg) != config_hash({**cfg, "name": "y"})
    assert config_hash({"a": 1}) != config_hash({"a": 1.0})
    literal = '{"a":1,"b":[1,2.5,null,true],"c":{"d":"é"}}'
    assert config_hash({"c": {"d": "é"}, "b": [1, 2.5, None, True], "a": 1}) == hashlib.sha256(
        literal.encode("utf-8")
    ).hexdigest()
    with pytest.raises(TypeError, match="model.path is a PosixPath"):
        config_hash({"model": {"path": Path("/x")}})
    with pytest.raises(ValueError, match="optim.lr is nan"):
        config_hash({"optim": {"lr": float("nan")}})


def draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(3).tolist(),
    )


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and numpy's
    state = capture_rng_state()
    expected = draws()
    make_manager(tmp_path).save(1, {"rng": state})
    # Scramble every generator, then restore from disk.
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draws() != expected
    loaded = make_manager(tmp_path).load_latest()
    restore_rng_state(loaded.payload["rng"])
    assert draws() == expected
