"""Evaluation stream: each sample once across ranks, manifest order, independent of num_workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset as wds

from ssl_vil.data import build_eval_stream
from ssl_vil.data.manifest import Manifest, ShardInfo, write_manifest
from synthetic_shards import encode_png, synthetic_image, synthetic_key, write_synthetic_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

SIZES = [7, 30, 1, 12, 25]


def to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _collect(shard_dir, world, workers, batch_size=4):
    per_rank = []
    for rank in range(world):
        stream = build_eval_stream(shard_dir, batch_size=batch_size, rank=rank, world_size=world,
                                   transform=to_tensor, num_workers=workers)
        batches = list(stream)
        assert len(batches) == len(stream)
        per_rank.append((stream, batches))
    return per_rank


def test_each_sample_once_in_manifest_order(tmp_path):
    write_synthetic_shards(tmp_path, SIZES)
    order = [synthetic_key("syn", s, i) for s, n in enumerate(SIZES) for i in range(n)]
    results = {w: _collect(tmp_path, 3, w) for w in (0, 2, 3)}
    for workers, per_rank in results.items():
        keys = [k for _, batches in per_rank for b in batches for k in b["keys"]]
        assert keys == order, f"num_workers={workers}"
        assert [s.num_samples for s, _ in per_rank] == [25, 25, 25]
        for _, batches in per_rank:
            assert [len(b["keys"]) for b in batches] == [4] * 6 + [1]
            for b in batches:
                assert b["images"].shape == (len(b["keys"]), 3, 16, 16) and b["images"].dtype == torch.uint8
                for key, image, label in zip(b["keys"], b["images"], b["labels"].tolist()):
                    s, i = int(key[4:7]), int(key[8:])
                    assert torch.equal(image, to_tensor(synthetic_image(s * 100_000 + i)))
                    assert label == (s * 1000 + i) % 10
    reference = results[0]
    for workers in (2, 3):
        for (_, a), (_, b) in zip(reference, results[workers]):
            assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))


def test_bad_records_dropped_and_counted(tmp_path):
    path = tmp_path / "syn-val-000000.tar"
    with open(path, "wb") as handle:
        writer = wds.TarWriter(handle, mtime=0)
        for i in range(6):
            image = b"\x89PNG broken" if i == 2 else encode_png(synthetic_image(i))
            writer.write({"__key__": synthetic_key("syn", 0, i), "png": image, "cls": i})
        writer.close()
    write_manifest(Manifest(tmp_path, "syn", "val", [ShardInfo(path.name, 6)], [], {}))
    stream = build_eval_stream(tmp_path, batch_size=3, rank=0, world_size=1, transform=to_tensor, num_workers=0)
    batches = list(stream)
    assert [b["keys"] for b in batches] == [[synthetic_key("syn", 0, i) for i in (0, 1)],
                                           [synthetic_key("syn", 0, i) for i in (3, 4, 5)]]
    assert batches[0]["data_errors"]["undecodable_image"] == 1 and batches[1]["data_errors"]["undecodable_image"] == 0
    assert stream.error_totals["undecodable_image"] == 1
