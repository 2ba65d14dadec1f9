"""Hostile shard content (hand-built tar files): out-of-range labels, non-UTF-8 member names, records above the
size bound and headers that declare gigabytes in a small file are counted as data issues, never a crash."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vil.data import COUNTER_KEYS, DataErrorBudgetExceeded, build_eval_stream, build_train_stream
from ssl_vil.data import tar_records
from ssl_vil.data.decode import MAX_LABEL, SampleIssue, decode_label
from ssl_vil.data.manifest import Manifest, ShardInfo, write_manifest
from ssl_vil.data.seeding import stable_seed
from synthetic_shards import encode_png, synthetic_image

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

PER_SHARD = 8
HUGE = 6 << 30  # declared size, far above any memory cap the tests set
SMALL_BOUND = 64 << 10  # max_record_bytes for the oversized-record case


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = size, kind, 0
    # surrogateescape: names given as surrogate-escaped text become the raw (non-UTF-8) bytes in the header.
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _member(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _png(shard: int, index: int, size: int = 16) -> bytes:
    return encode_png(synthetic_image(shard * 1000 + index, size))


def _record(key: str, shard: int, index: int, cls: bytes | None = None, image: bytes | None = None) -> bytes:
    out = _member(f"{key}.png", image if image is not None else _png(shard, index))
    return out + _member(f"{key}.cls", cls if cls is not None else str(index % 10).encode())


def _key(shard: int, index: int) -> str:
    return f"h{shard}_{index}"


BAD_NAMES = {(1, 1): "bad\udcffname", (1, 4): "x\udcc3(y"}  # raw bytes b"bad\xffname", b"x\xc3(y"
BAD_LABELS = {(0, 2): b"99999999999999999999", (0, 5): b"-3", (1, 6): str(MAX_LABEL + 1).encode()}
OVERSIZED = (2, 3)  # one 100 KiB member: above SMALL_BOUND
HUGE_MEMBER_AT = (3, 5)  # its image member declares HUGE bytes; the file ends a few bytes later
HUGE_PAX_AFTER = (4, 3)  # a PAX header declaring HUGE bytes follows this record (which it is charged to)


def build_hostile_shards(out: Path) -> dict:
    """Five shards of 8 records with the hostile records above; returns the keys a correct reader yields and the
    expected issue counts."""
    out.mkdir(parents=True, exist_ok=True)
    good: list[str] = []
    paths = []
    for s in range(5):
        body = b""
        for i in range(PER_SHARD):
            key = BAD_NAMES.get((s, i), _key(s, i))
            if (s, i) == HUGE_MEMBER_AT:
                body += _header(f"{key}.png", HUGE) + b"\x89PNG" + b"\0" * 508
                break
            if (s, i) == OVERSIZED:
                body += _record(key, s, i, image=_png(s, i) + os.urandom(100 << 10))
                continue
            body += _record(key, s, i, cls=BAD_LABELS.get((s, i)))
            if (s, i) == HUGE_PAX_AFTER:  # an unreadable header is charged to the record before it
                body += _header("././@PaxHeader", HUGE, tarfile.XHDTYPE) + b"30 path=" + b"a" * 504
                break
            if (s, i) not in BAD_LABELS:
                good.append(key)
        else:
            body += b"\0" * (2 * tarfile.BLOCKSIZE)
        path = out / f"hostile-train-{s:06d}.tar"
        path.write_bytes(body)
        paths.append(path)
    write_manifest(Manifest(out, "hostile", "train", [ShardInfo(p.name, PER_SHARD) for p in paths], [], {}))
    counts = dict.fromkeys(COUNTER_KEYS, 0)
    counts.update(bad_label=3, oversized_record=1, truncated_shard=2)
    lost_truncated = (PER_SHARD - HUGE_MEMBER_AT[1]) + (PER_SHARD - HUGE_PAX_AFTER[1])
    counts["lost_samples"] = 3 + 1 + lost_truncated
    assert len(good) == 5 * PER_SHARD - counts["lost_samples"]
    return {"good": good, "counts": counts, "paths": [str(p) for p in paths]}


def full_view(image, generator):
    del generator
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def eval_view(image):
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def run_train_epoch(shards: Path, *, workers: int, budget: float | None) -> dict:
    stream = build_train_stream(shards, batch_size=4, seed=3, rank=0, world_size=1, num_workers=workers,
                                transform=full_view, error_budget_fraction=budget, shuffle_window_samples=4)
    keys, labels, totals = [], {}, dict.fromkeys(COUNTER_KEYS, 0)
    views: dict[str, list] = {}
    for batch in stream:
        for k, v in batch["data_errors"].items():
            totals[k] += v
        for i, (key, pad) in enumerate(zip(batch["keys"], batch["padded"].tolist())):
            if not pad:
                keys.append(key)
                labels[key] = int(batch["labels"][i])
                views[key] = batch["views"][i].tolist()
    return {"keys": keys, "labels": labels, "totals": totals, "views": views, "tally": stream.error_totals}


def run_eval(shards: Path, *, workers: int) -> dict:
    stream = build_eval_stream(shards, batch_size=3, rank=0, world_size=1, transform=eval_view, num_workers=workers)
    keys, totals = [], dict.fromkeys(COUNTER_KEYS, 0)
    for batch in stream:
        keys.extend(batch["keys"])
        assert batch["labels"].dtype == torch.long and int(batch["labels"].min()) >= 0
        for k, v in batch["data_errors"].items():
            totals[k] += v
    return {"keys": keys, "totals": totals, "tally": stream.error_totals}


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    # Read when each reader is made, so the fork-started DataLoader workers see it too.
    monkeypatch.setattr(tar_records, "MAX_RECORD_BYTES", SMALL_BOUND)
    return tmp_path / "shards", build_hostile_shards(tmp_path / "shards")


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_yields_exactly_the_good_records_and_counts_each_issue(hostile, workers):
    shards, planted = hostile
    out = run_train_epoch(shards, workers=workers, budget=None)
    assert sorted(out["keys"]) == sorted(planted["good"])  # each good record once, the non-UTF-8 names included
    assert out["totals"] == planted["counts"]
    assert out["tally"] == planted["counts"]
    for (s, i), name in BAD_NAMES.items():
        assert out["labels"][name] == i % 10
        assert out["views"][name] == full_view(_decoded(s, i), None).tolist()


def _decoded(shard: int, index: int) -> Image.Image:
    return Image.open(io.BytesIO(_png(shard, index))).convert("RGB")


def test_train_stream_is_deterministic_and_worker_independent_with_non_utf8_keys(hostile):
    shards, _ = hostile
    a, b = run_train_epoch(shards, workers=0, budget=None), run_train_epoch(shards, workers=2, budget=None)
    assert a["keys"] == b["keys"] and a["views"] == b["views"]
    # The per-sample seed of a surrogate-escaped key is a fixed function of its raw bytes.
    assert stable_seed(1, "sample", 0, "bad\udcffname") == stable_seed(1, "sample", 0, "bad\udcffname")
    assert stable_seed(1, "sample", 0, "bad\udcffname") != stable_seed(1, "sample", 0, "bad\udcfename")
    # Valid text hashes as plain UTF-8, as before: existing runs keep their seeds.
    assert stable_seed(7, "abc") == int.from_bytes(
        hashlib.blake2b(b"7\x1fabc", digest_size=8).digest(), "little") & ((1 << 63) - 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_stream_yields_exactly_the_good_records_in_order(hostile, workers):
    shards, planted = hostile
    out = run_eval(shards, workers=workers)
    assert out["keys"] == planted["good"]  # manifest order
    assert out["tally"] == planted["counts"] | {"lost_samples": 0}  # evaluation drops, it does not pad
    assert out["totals"] == out["tally"]


def test_error_budget_that_allows_the_hostile_records_finishes_and_a_smaller_one_stops(hostile):
    shards, planted = hostile
    lost = planted["counts"]["lost_samples"]
    fraction = lost / (5 * PER_SHARD)
    out = run_train_epoch(shards, workers=2, budget=fraction)
    assert out["totals"] == planted["counts"]
    with pytest.raises(DataErrorBudgetExceeded, match="above the error budget"):
        run_train_epoch(shards, workers=2, budget=(lost - 1) / (5 * PER_SHARD))


@pytest.mark.parametrize("raw", [b"9223372036854775808", b"99999999999999999999", b"-1", b"-3",
                                 str(MAX_LABEL + 1).encode(), b"1" * 5000])
def test_labels_outside_the_class_index_range_are_bad_labels(raw):
    with pytest.raises(SampleIssue) as info:
        decode_label({"cls": raw}, url="u", record=4, key="k")
    assert (info.value.issue.category, info.value.issue.record, info.value.issue.key) == ("bad_label", 4, "k")


def test_labels_at_the_range_ends_and_missing_labels():
    assert decode_label({"cls": b"0"}, url="u", record=0, key="k") == 0
    assert decode_label({"cls": f" {MAX_LABEL}\n".encode()}, url="u", record=0, key="k") == MAX_LABEL
    assert decode_label({}, url="u", record=0, key="k") == -1


def test_oversized_record_is_skipped_without_losing_its_neighbours(tmp_path):
    body = _record("a", 0, 0) + _record("big", 0, 1, image=_png(0, 1) + b"\0" * 5000) + _record("c", 0, 2)
    path = tmp_path / "s.tar"
    path.write_bytes(body + b"\0" * 1024)
    for url in (str(path), f"pipe:cat {path}"):
        with tar_records.ShardRecordReader(url, 3, max_record_bytes=4096) as reader:
            records = reader.read(0, 3)
        assert [(r.key, r.error.category if r.error else None) for r in records] == [
            ("a", None), ("big", "oversized_record"), ("c", None)], url
        assert records[1].members is None and set(records[2].members) == {"png", "cls"}
        assert records[2].members["png"] == _png(0, 2)


CAPPED_RUNNER = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, torch
    from ssl_vil.data import build_eval_stream, build_train_stream

    shards, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    cap = vm + (2 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:  # the cap is real: an allocation of the declared size fails under it
        bytearray(6 << 30)
        raise SystemExit("the address-space cap did not apply")
    except MemoryError:
        pass
    view = lambda image: torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    train = build_train_stream(shards, batch_size=4, seed=3, rank=0, world_size=1, num_workers=workers,
                               transform=lambda image, g: view(image), error_budget_fraction=None,
                               shuffle_window_samples=4)
    train_keys = [k for b in train for k, p in zip(b["keys"], b["padded"].tolist()) if not p]
    ev = build_eval_stream(shards, batch_size=3, rank=0, world_size=1, transform=view, num_workers=workers)
    eval_keys = [k for b in ev for k in b["keys"]]
    json.dump({"train": sorted(train_keys), "train_tally": train.error_totals, "eval": eval_keys,
               "eval_tally": ev.error_totals}, open(out, "w"))
    """
)


@pytest.mark.timeout(180)
def test_huge_declared_sizes_are_never_allocated_under_a_memory_cap(tmp_path):
    """Shards 3 and 4 only: a member and a PAX header that declare 6 GiB in files of a few KiB; without the
    bound, tarfile asks the file for the declared size in one read and the buffered reader allocates it."""
    shards = tmp_path / "all"
    planted = build_hostile_shards(shards)
    only = tmp_path / "huge"
    only.mkdir()
    names = [Path(p).name for p in planted["paths"][3:]]
    for name in names:
        (only / name).write_bytes((shards / name).read_bytes())
    write_manifest(Manifest(only, "hostile", "train", [ShardInfo(n, PER_SHARD) for n in names], [], {}))
    good = [k for k in planted["good"] if k.startswith(("h3_", "h4_"))]
    assert good == [*(_key(3, i) for i in range(HUGE_MEMBER_AT[1])), *(_key(4, i) for i in range(HUGE_PAX_AFTER[1]))]
    counts = dict.fromkeys(COUNTER_KEYS, 0)
    counts.update(truncated_shard=2, lost_samples=2 * PER_SHARD - len(good))
    script = tmp_path / "capped.py"
    script.write_text(CAPPED_RUNNER)
    for workers in (0, 2):
        out = tmp_path / f"out{workers}.json"
        proc = subprocess.run([sys.executable, str(script), str(only), str(out), str(workers)], capture_output=True,
                              text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(out.read_text())
        assert result["train"] == sorted(good) and result["eval"] == good
        assert result["train_tally"] == counts
        assert result["eval_tally"] == counts | {"lost_samples": 0}
