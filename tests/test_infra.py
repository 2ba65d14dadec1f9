"""ssl_vil.infra: atomic writes, the JSONL truncate-on-resume rule, precision resolution, single-process collectives."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ssl_vil.infra import dist
from ssl_vil.infra.files import (
    JsonlLog,
    atomic_output,
    is_temp_name,
    read_jsonl,
    temp_path,
    write_json_atomic,
    write_text_atomic,
)
from ssl_vil.infra.precision import autocast, resolve_precision
from ssl_vil.infra.timing import StepTiming


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "config.yaml"
    write_text_atomic(path, "a: 1\n")
    write_text_atomic(path, "a: 2\n")
    assert path.read_text() == "a: 2\n"
    write_json_atomic(tmp_path / "r.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["config.yaml", "r.json"]


def test_failed_atomic_write_keeps_old_content(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(path) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("writer died")
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def test_temp_names_are_hidden_and_recognised(tmp_path):
    tmp = temp_path(tmp_path / "LATEST")
    assert tmp.name == f".LATEST.tmp-{os.getpid()}" and is_temp_name(tmp.name)
    assert not is_temp_name("LATEST") and not is_temp_name(".tmp-step_00000005-12")


def _write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_jsonl_truncate_keeps_the_prefix_up_to_the_resume_step(tmp_path):
    path = tmp_path / "log.jsonl"
    _write_lines(path, [{"step": 1}, {"event": "start"}, {"step": 2}, {"event": "eval", "step": 2}, {"step": 3},
                        {"event": "late"}, {"step": 4}], tail='{"step": 5, "lo')
    with JsonlLog(path, resume_step=2) as log:
        log.write({"step": 3, "x": float("nan")})
    assert [r.get("step", r.get("event")) for r in read_jsonl(path)] == [1, "start", 2, 2, 3]
    assert read_jsonl(path)[-1]["x"] != read_jsonl(path)[-1]["x"]  # NaN survives the round trip


def test_jsonl_truncate_drops_torn_lines_and_counts(tmp_path):
    path = tmp_path / "log.jsonl"
    _write_lines(path, [{"step": 1}, {"step": 2}], tail='{"step": 3, "lo')
    log = JsonlLog(path)
    assert log.truncate_after(2) == 1
    assert log.truncate_after(2) == 0
    log.write({"step": 3})
    log.close()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    _write_lines(path, [{"step": 1}], tail="{torn")
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)
    assert read_jsonl(path, skip_bad=True) == [{"step": 1}]


def test_disabled_jsonl_log_touches_nothing(tmp_path):
    log = JsonlLog(tmp_path / "run" / "log.jsonl", resume_step=0, enabled=False)
    log.write({"step": 1})
    assert log.truncate_after(0) == 0
    log.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("precision, device, resolved", [
    ("auto", "cpu", "fp32"), ("auto", "cuda", "bf16"), ("bf16", "cpu", "bf16"), ("fp16", "cuda", "fp16"),
    ("fp32", "cuda", "fp32"),
])
def test_resolve_precision(precision, device, resolved):
    assert resolve_precision(precision, torch.device(device)) == resolved


def test_autocast_contexts_on_cpu():
    with autocast("auto", "cpu"):
        assert not torch.is_autocast_cpu_enabled()
    with autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", "cpu")


def test_collectives_are_identities_without_a_process_group():
    assert not dist.is_distributed() and dist.world_size() == 1 and dist.rank() == 0
    t = torch.tensor([1.0, 3.0])
    assert dist.all_reduce_(t, "mean") is t and t.tolist() == [1.0, 3.0]
    assert dist.all_reduce_scalar(7, "max") == 7 and isinstance(dist.all_reduce_scalar(7), int)
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.collective_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown reduce op"):
        dist.all_reduce_(t, "prod")


def test_step_timing_eta():
    timing = StepTiming(steps=4, samples=64, data_wait_s=1.0, compute_s=3.0)
    assert timing.eta_s(10) == pytest.approx(10.0) and timing.eta_s(-3) == 0.0
    assert StepTiming(0, 0, 0.0, 0.0).eta_s(5) != StepTiming(0, 0, 0.0, 0.0).eta_s(5)  # NaN: unknown
