"""Planted bad data: typed counts across 2 ranks x 2 workers (real gloo), good-sample count, budget error."""

from __future__ import annotations

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
import webdataset as wds
from PIL import Image

from ssl_vil.data import COUNTER_KEYS, DataErrorBudgetExceeded, build_train_stream
from ssl_vil.data.manifest import Manifest, ShardInfo, write_manifest
from synthetic_shards import encode_png, synthetic_image, synthetic_key

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

PER_SHARD = 20
MAX_PIXELS = 128 * 128


def _jpeg(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode != "RGB" else image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _record(shard: int, index: int) -> dict:
    return {"__key__": synthetic_key("syn", shard, index),
            "png": encode_png(synthetic_image(shard * 100_000 + index)), "cls": index % 10}


def _write(out: Path, shard: int, records: list[dict]) -> Path:
    path = out / f"syn-train-{shard:06d}.tar"
    with open(path, "wb") as handle:
        writer = wds.TarWriter(handle, mtime=0)
        for record in records:
            writer.write(record)
        writer.close()
    return path


def build_faulty_shards(out: Path) -> dict:
    """Ten shards of 20 records with the ten planted faults; returns what a correct reader must report."""
    out.mkdir(parents=True, exist_ok=True)
    good_jpeg = _jpeg(synthetic_image(7, 32))
    records = {s: [_record(s, i) for i in range(PER_SHARD)] for s in range(10)}
    bad: dict[str, list[tuple[int, str]]] = {}

    def plant(category, shard, index, **fields):
        key = synthetic_key("syn", shard, index)
        records[shard][index] = {"__key__": key, **fields}
        bad.setdefault(category, []).append((shard, key))

    plant("undecodable_image", 0, 3, jpg=os.urandom(900), cls=3)
    plant("undecodable_image", 1, 5, jpg=good_jpeg[:150], cls=5)  # a JPEG cut after its headers
    plant("undecodable_image", 2, 0, jpg=good_jpeg[:2] + os.urandom(600), cls=0)
    plant("missing_image", 5, 9, cls=9, json={"note": "no image member"})
    plant("oversized_image", 6, 4, png=encode_png(synthetic_image(64, 200)), cls=4)  # 200x200 > 128x128
    cmyk = _jpeg(synthetic_image(11, 16), mode="CMYK")
    gray = Image.fromarray(synthetic_image(12, 16)[:, :, 0], mode="L")
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG")
    records[0][11] = {"__key__": synthetic_key("syn", 0, 11), "jpg": cmyk, "cls": 1}
    records[1][7] = {"__key__": synthetic_key("syn", 1, 7), "png": buffer.getvalue(), "cls": 7}
    # Record 15 of shard 7 reuses record 2's key.
    dup_key = synthetic_key("syn", 7, 2)
    records[7][15] = {**_record(7, 15), "__key__": dup_key}
    bad["duplicate_key"] = [(7, dup_key)]
    paths = [_write(out, s, records[s]) for s in range(10)]
    write_manifest(Manifest(out, "syn", "train", [ShardInfo(p.name, PER_SHARD) for p in paths], [], {}))

    # Truncate shard 3 in the middle of record 12's image bytes (like `dd count=`), and empty shard 4.
    with tarfile.open(paths[3]) as tar:
        member = next(m for m in tar.getmembers() if m.name == synthetic_key("syn", 3, 12) + ".png")
    with open(paths[3], "r+b") as handle:
        handle.truncate(member.offset_data + member.size // 2)
    bad["truncated_shard"] = [(3, synthetic_key("syn", 3, 12))]
    lost_truncated = {synthetic_key("syn", 3, i) for i in range(12, PER_SHARD)}
    paths[4].write_bytes(b"")
    bad["empty_shard"] = [(4, None)]
    lost_empty = {synthetic_key("syn", 4, i) for i in range(PER_SHARD)}

    sample_level = ("undecodable_image", "missing_image", "oversized_image")
    planted_bad_positions = {(s, k) for c in sample_level for s, k in bad[c]}
    all_keys = [r["__key__"] for s in range(10) for r in records[s]]
    good = [k for s in range(10) for r in records[s] if (k := r["__key__"]) not in lost_truncated | lost_empty
            and (s, k) not in planted_bad_positions]
    good.remove(dup_key)  # the first record with that key is good, the repeat is not
    assert len(all_keys) == 10 * PER_SHARD
    return {
        "paths": [str(p) for p in paths],
        "bad": bad,
        "good_keys": sorted(good),
        "lost": 3 + len(lost_truncated) + len(lost_empty) + 1 + 1 + 1,
        "cmyk": cmyk,
        "gray": np.asarray(gray),
    }


RANK_RUNNER = textwrap.dedent(
    """
    import json, logging, sys
    import numpy as np, torch
    import torch.distributed as dist
    from ssl_vil.data import build_train_stream, reduce_error_counts

    shard_dir, rank, world, init_file, out = sys.argv[1:]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    logged = []
    class Capture(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())
    logging.getLogger("ssl_vil.data").addHandler(Capture())

    def full(image, generator):
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    stream = build_train_stream(shard_dir, batch_size=3, seed=5, rank=rank, world_size=world, num_workers=2,
                                transform=full, error_budget_fraction=None, max_image_pixels=128 * 128,
                                shuffle_window_samples=4)
    totals = {}
    keys, details, views = [], [], {}
    for batch in stream:
        for k, v in batch["data_errors"].items():
            totals[k] = totals.get(k, 0) + v
        details.extend(batch["data_error_details"])
        for i, (key, pad) in enumerate(zip(batch["keys"], batch["padded"].tolist())):
            if not pad:
                keys.append(key)
                if key in ("syns000i00011", "syns001i00007"):
                    views[key] = batch["views"][i].tolist()
    reduced = reduce_error_counts(totals)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"keys": keys, "details": details, "logged": logged, "views": views,
                                      "local": totals, "steps": stream.batches_per_epoch})
    if rank == 0:
        json.dump({"reduced": reduced, "ranks": gathered}, open(out, "w"))
    from ssl_vil.infra.dist import leave_group
    leave_group()  # all ranks together
    """
)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_planted_faults_counted_across_2_ranks_x_2_workers(tmp_path):
    planted = build_faulty_shards(tmp_path / "shards")
    script = tmp_path / "rank.py"
    script.write_text(RANK_RUNNER)
    out = tmp_path / "result.json"
    init = tmp_path / "init"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "shards"), str(r), "2", str(init), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=150)
        assert p.returncode == 0, err[-3000:]
    result = json.loads(out.read_text())
    reduced = result["reduced"]
    expected = {k: 0 for k in COUNTER_KEYS}
    for category, items in planted["bad"].items():
        expected[category] = len(items)
    expected["lost_samples"] = planted["lost"]
    assert reduced == expected
    assert {k: sum(r["local"][k] for r in result["ranks"]) for k in COUNTER_KEYS} == expected

    keys = [k for r in result["ranks"] for k in r["keys"]]
    assert sorted(keys) == planted["good_keys"]  # every good sample once, nothing else
    assert len(keys) == 10 * PER_SHARD - planted["lost"]

    # First occurrences carry shard URL and key; each category is logged once per rank that met it.
    details = {}
    for rank in result["ranks"]:
        for d in rank["details"]:
            details.setdefault(d["category"], []).append(d)
        for category in {d["category"] for d in rank["details"]}:
            assert sum(f"[{category}]" in m for m in rank["logged"]) == 1
    assert set(details) == set(planted["bad"])
    for category, items in planted["bad"].items():
        urls = {planted["paths"][s] for s, _ in items}
        assert all(d["url"] in urls for d in details[category])
        keys_named = {k for _, k in items}
        assert all(d["key"] in keys_named for d in details[category])

    # CMYK and grayscale decode to the RGB PIL gives for them.
    views = {k: v for r in result["ranks"] for k, v in r["views"].items()}
    cmyk_rgb = np.asarray(Image.open(io.BytesIO(planted["cmyk"])).convert("RGB"))
    assert np.array_equal(np.asarray(views["syns000i00011"]).transpose(1, 2, 0), cmyk_rgb)
    gray = planted["gray"]
    assert np.array_equal(np.asarray(views["syns001i00007"]).transpose(1, 2, 0), np.stack([gray] * 3, -1))


def test_error_budget_stops_the_run_naming_the_bad_shards(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    paths = []
    for s in range(10):
        records = [_record(s, i) for i in range(PER_SHARD)]
        if s in (2, 6):  # 10 undecodable images in 200 = 5 %
            for i in range(0, PER_SHARD, 4):
                records[i] = {"__key__": synthetic_key("syn", s, i), "jpg": b"\xff\xd8" + os.urandom(300)}
        paths.append(_write(out, s, records))
    write_manifest(Manifest(out, "syn", "train", [ShardInfo(p.name, PER_SHARD) for p in paths], [], {}))
    stream = build_train_stream(out, batch_size=4, seed=0, rank=0, world_size=1, num_workers=2,
                                transform=lambda image, g: torch.zeros(1), error_budget_fraction=0.01)
    seen = 0
    with pytest.raises(DataErrorBudgetExceeded) as info:
        for _ in stream:
            seen += 1
    message = str(info.value)
    assert seen < stream.batches_per_epoch
    assert "above the error budget of 1.00%" in message and "undecodable_image" in message
    named = [p for p in paths if str(p) in message]
    assert named and set(named) <= {paths[2], paths[6]}
    # The same data within a 10 % budget runs the whole epoch, losing exactly the 10 bad samples.
    relaxed = build_train_stream(out, batch_size=4, seed=0, rank=0, world_size=1, num_workers=0,
                                 transform=lambda image, g: torch.zeros(1), error_budget_fraction=0.1)
    lost = sum(batch["data_errors"]["lost_samples"] for batch in relaxed)
    assert lost == 10 and relaxed.error_totals["undecodable_image"] == 10
