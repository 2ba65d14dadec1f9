"""Training stream: exactly-once epochs, equal steps, worker/topology invariance, resampled mode, cursor checks."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_vil.config.errors import ConfigError
from ssl_vil.data import DataConfigError, build_train_stream, default_collate_views, resolve_shards
from synthetic_shards import synthetic_key, write_synthetic_shards

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

# 13 shards of uneven size (1..500 samples).
SIZES = [1, 500, 37, 3, 250, 120, 7, 499, 64, 2, 180, 90, 11]
ALL_KEYS = {synthetic_key("syn", s, i) for s, n in enumerate(SIZES) for i in range(n)}


def crop_transform(image, generator):
    """Two views: a random 12x12 crop and a randomly flipped full image, both driven by ``generator``."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    i, j, flip = torch.randint(0, 5, (3,), generator=generator).tolist()
    full = pixels.flip(-1) if flip % 2 else pixels
    return [pixels[:, i : i + 12, j : j + 12].contiguous(), full.contiguous()]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn13")
    write_synthetic_shards(out, SIZES)
    return out


def _stream(shard_dir, **kw):
    args = dict(batch_size=5, seed=3, rank=0, world_size=1, num_workers=0, transform=crop_transform,
                shuffle_window_samples=32)
    args.update(kw)
    return build_train_stream(shard_dir, **args)


def _run_epoch_lockstep(streams):
    """Iterate the ranks' streams side by side; returns per-rank batch lists (fails if counts differ)."""
    iters = [iter(s) for s in streams]
    per_rank = [[] for _ in streams]
    while True:
        batches = [next(it, None) for it in iters]
        if all(b is None for b in batches):
            return per_rank
        assert all(b is not None for b in batches), "ranks yielded different numbers of batches"
        for r, b in enumerate(batches):
            per_rank[r].append(b)


@pytest.mark.slow
@pytest.mark.timeout(60)  # no hang: webdataset's uneven-shard deadlock would stall here
def test_epoch_mode_exactly_once_across_3_ranks_x_2_workers(shard_dir):
    streams = [_stream(shard_dir, rank=r, world_size=3, num_workers=2) for r in range(3)]
    n, g = sum(SIZES), 15
    steps = -(-n // g)
    assert all(s.batches_per_epoch == steps for s in streams)
    orders = []
    for epoch in range(2):
        assert all(s.epoch == epoch for s in streams)
        per_rank = _run_epoch_lockstep(streams)
        assert [len(b) for b in per_rank] == [steps] * 3
        real = collections.Counter()
        padded = 0
        order = []
        for step in range(steps):
            for r in range(3):
                batch = per_rank[r][step]
                assert batch["epoch"] == epoch and batch["batch_in_epoch"] == step
                assert batch["views"][0].shape == (5, 3, 12, 12) and batch["labels"].shape == (5,)
                for key, pad in zip(batch["keys"], batch["padded"].tolist()):
                    if pad:
                        padded += 1
                        assert key in ALL_KEYS  # padding repeats a real sample, flagged
                    else:
                        real[key] += 1
                        order.append(key)
        assert set(real) == ALL_KEYS and max(real.values()) == 1
        assert padded == steps * g - n
        orders.append(order)
    assert orders[0] != orders[1]  # a new epoch permutes differently
    assert all(s.epoch == 2 for s in streams)


def test_too_few_shards_is_a_config_error_before_training(tmp_path):
    write_synthetic_shards(tmp_path, [3, 3, 3, 3, 3])
    with pytest.raises(DataConfigError, match="fewer shards than workers") as info:
        build_train_stream(tmp_path, batch_size=2, seed=0, rank=0, world_size=3, num_workers=2,
                           transform=crop_transform)
    assert isinstance(info.value, ConfigError)
    assert "5 shard(s) for 3 rank(s) x 2 worker(s) = 6" in str(info.value)


def test_pipe_urls_refused_unless_allowed(shard_dir):
    spec = f"pipe:cat {shard_dir}/syn-train-{{000000..000012}}.tar"
    with pytest.raises(DataConfigError, match="allow_pipe=True"):
        resolve_shards(spec)
    sizes = json.loads((shard_dir / "sizes.json").read_text())
    piped = _stream(spec, allow_pipe=True, shard_sizes=sizes, batch_size=16)
    local = _stream(shard_dir, batch_size=16)
    # A streamed (non-seekable) read delivers exactly what the seekable local read does.
    for step, (a, b) in enumerate(zip(piped, local)):
        assert a["keys"] == b["keys"]
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))
        if step == 12:
            break


def _sequence(stream, max_batches=None):
    out = []
    for step, batch in enumerate(stream):
        out.append((batch["keys"], [v.clone() for v in batch["views"]], batch["padded"].tolist()))
        if max_batches is not None and step + 1 == max_batches:
            break
    return out


def _assert_same(seq_a, seq_b):
    assert len(seq_a) == len(seq_b)
    for (ka, va, pa), (kb, vb, pb) in zip(seq_a, seq_b):
        assert ka == kb and pa == pb
        assert all(torch.equal(x, y) for x, y in zip(va, vb))


@pytest.mark.slow
def test_worker_count_invariance_0_vs_4(shard_dir):
    seq0 = _sequence(_stream(shard_dir, batch_size=8, num_workers=0))
    seq4 = _sequence(_stream(shard_dir, batch_size=8, num_workers=4))
    _assert_same(seq0, seq4)
    assert sum(len(k) for k, _, _ in seq0) == 8 * -(-sum(SIZES) // 8)


def test_global_batches_identical_across_topologies(shard_dir):
    """World 1x4, 2x2 and 4x1 (same global batch) produce the same global batches and views."""
    def global_batches(world, per_rank):
        streams = [_stream(shard_dir, rank=r, world_size=world, batch_size=per_rank) for r in range(world)]
        per = _run_epoch_lockstep(streams)
        out = []
        for step in range(len(per[0])):
            keys = [k for r in range(world) for k in per[r][step]["keys"]]
            views = torch.cat([per[r][step]["views"][0] for r in range(world)])
            out.append((keys, views))
        return out

    reference = global_batches(1, 4)
    for world, per_rank in ((2, 2), (4, 1)):
        other = global_batches(world, per_rank)
        assert [k for k, _ in other] == [k for k, _ in reference]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(other, reference))


def test_sample_views_depend_on_key_and_epoch_only(shard_dir):
    """Same key in two epochs gets different views; recomputing a view from (seed, epoch, key) matches."""
    from ssl_vil.data.seeding import make_generator, stable_seed
    from synthetic_shards import synthetic_image
    from PIL import Image

    stream = _stream(shard_dir, batch_size=16)
    batch = next(iter(stream))
    key = batch["keys"][0]
    s, i = int(key[4:7]), int(key[8:])
    image = Image.fromarray(synthetic_image(s * 100_000 + i, 16))
    expected = crop_transform(image, make_generator(stable_seed(3, "sample", 0, key)))
    assert torch.equal(batch["views"][0][0], expected[0]) and torch.equal(batch["views"][1][0], expected[1])


@pytest.mark.slow
def test_resampled_mode_deterministic_and_worker_invariant(shard_dir):
    kw = dict(mode="resampled", batch_size=6, samples_per_epoch=300)
    seq0 = _sequence(_stream(shard_dir, num_workers=0, **kw))
    seq3 = _sequence(_stream(shard_dir, num_workers=3, **kw))
    _assert_same(seq0, seq3)
    assert len(seq0) == 50
    seen = collections.defaultdict(list)
    for keys, views, _ in seq0:
        for k, view in zip(keys, views[0]):
            seen[k].append(view)
    repeated = [k for k, v in seen.items() if len(v) > 1]
    assert repeated, "sampling with replacement should repeat the 1-sample shard's key"
    # Each draw gets its own augmentation, so repeats of a key differ.
    assert any(not torch.equal(seen[k][0], seen[k][1]) for k in repeated)
    assert set(seen) <= ALL_KEYS


def test_resampled_ranks_equal_steps_and_cursor_continues(shard_dir):
    kw = dict(mode="resampled", batch_size=3, samples_per_epoch=90, world_size=2)
    streams = [_stream(shard_dir, rank=r, **kw) for r in range(2)]
    per = _run_epoch_lockstep(streams)
    assert [len(p) for p in per] == [15, 15]
    assert streams[0].epoch == 1
    reference = _sequence(streams[0], max_batches=6)  # epoch 1, first 6 batches
    fresh = _stream(shard_dir, rank=0, **kw)
    fresh.load_state_dict({**streams[0].state_dict(), "epoch": 1, "batches_consumed": 0})
    first = _sequence(fresh, max_batches=2)
    state = fresh.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (1, 2)
    resumed = _stream(shard_dir, rank=0, **kw)
    resumed.load_state_dict(state)
    _assert_same(first + _sequence(resumed, max_batches=4), reference)


def test_cursor_refuses_other_data_or_global_batch(shard_dir):
    stream = _stream(shard_dir, batch_size=4)
    state = stream.state_dict()
    assert state["global_batch_size"] == 4 and state["epoch"] == 0 and state["batches_consumed"] == 0
    with pytest.raises(DataConfigError, match="global_batch_size: saved 4, now 8"):
        _stream(shard_dir, batch_size=8).load_state_dict(state)
    with pytest.raises(DataConfigError, match="seed: saved 3, now 4"):
        _stream(shard_dir, batch_size=4, seed=4).load_state_dict(state)
    # Same global batch on another topology is accepted.
    _stream(shard_dir, batch_size=2, world_size=2, rank=1).load_state_dict(state)


def test_collate_gets_generator_seeded_by_epoch_batch_and_rank(shard_dir):
    seen = []

    def collate(samples, generator):
        seen.append(torch.randint(0, 2**31, (1,), generator=generator).item())
        return default_collate_views(samples, generator)

    for rank in range(2):
        stream = _stream(shard_dir, batch_size=4, world_size=2, rank=rank, collate=collate)
        for step, _ in enumerate(stream):
            if step == 1:
                break
    again = []
    stream = _stream(shard_dir, batch_size=4, world_size=2, rank=0,
                     collate=lambda s, g: (again.append(torch.randint(0, 2**31, (1,), generator=g).item()),
                                           default_collate_views(s, g))[1])
    next(iter(stream))
    assert len(set(seen)) == 4  # differs across batch index and rank
    assert again[0] == seen[0]  # reproducible


def test_default_collate_views_stacks_lists_and_tensors():
    samples = [{"key": f"k{i}", "label": i - 1, "views": [torch.full((3, 4, 4), i), torch.full((3, 2, 2), -i)]}
               for i in range(3)]
    batch = default_collate_views(samples, torch.Generator())
    assert batch["keys"] == ["k0", "k1", "k2"]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [-1, 0, 1]
    assert [v.shape for v in batch["views"]] == [(3, 3, 4, 4), (3, 3, 2, 2)]
    assert batch["views"][1][2, 0, 0, 0].item() == -2
    single = default_collate_views([{**s, "views": s["views"][0]} for s in samples], torch.Generator())
    assert single["views"].shape == (3, 3, 4, 4)
    with pytest.raises(ValueError, match="sample 'k1' has 1 views"):
        default_collate_views([samples[0], {**samples[1], "views": samples[1]["views"][:1]}], torch.Generator())


def _batch_tensors(batch):
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


@pytest.mark.timeout(120)
def test_stacked_worker_parts_give_the_per_sample_batches(shard_dir):
    """With workers, the mask collate concatenates the workers' stacked parts (collate_stacked); with 0 workers it
    collates sample by sample. Both give the same batches, bit for bit, including for B not divisible by W."""
    from ssl_vil.objectives.masking import MultiCropMaskCollate

    def batches(workers):
        collate = MultiCropMaskCollate((3, 3), n_global=1, n_local=1, mask_probability=1.0)
        stream = _stream(shard_dir, num_workers=workers, collate=collate, batch_size=5)
        calls = collections.Counter()
        stacked_call = collate.collate_stacked

        def counted(*a):
            calls["stacked"] += 1
            return stacked_call(*a)

        collate.collate_stacked = counted
        out = [b for _, b in zip(range(12), stream)]
        return out, calls["stacked"]

    ref, stacked_ref = batches(0)
    got, stacked_got = batches(3)
    assert (stacked_ref, stacked_got) == (0, 12)  # 0 workers: per sample; 3 workers: the stacked path every step
    assert len({k for b in ref for k in b["keys"]}) == 60
    for a, b in zip(ref, got):
        assert a["keys"] == b["keys"]
        ta, tb = _batch_tensors(a), _batch_tensors(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_collate_stacked_equals_per_sample_and_refers_misfits_to_it():
    from ssl_vil.data.collate import StackedSamples
    from ssl_vil.objectives.masking import MultiCropMaskCollate

    g = torch.Generator().manual_seed(0)
    sizes = [2, 3]  # two parts, samples in order
    parts = [[torch.rand(n, 3, 8, 8, generator=g), torch.rand(n, 3, 8, 8, generator=g),
              torch.rand(n, 3, 4, 4, generator=g)] for n in sizes]
    stacked = StackedSamples(keys=[f"k{i}" for i in range(5)], labels=list(range(5)), parts=parts)
    collate = MultiCropMaskCollate((2, 2), n_global=2, n_local=1, mask_probability=1.0)
    a = collate.collate_stacked(stacked, torch.Generator().manual_seed(7))
    b = collate(stacked.samples(), torch.Generator().manual_seed(7))
    assert a["keys"] == b["keys"] == [f"k{i}" for i in range(5)]
    assert a["global_crops"].shape == (10, 3, 8, 8) and a["local_crops"].shape == (5, 3, 4, 4)
    # view-major: row v * B + b is view v of sample b (sample 3 = part 1, row 1).
    assert torch.equal(a["global_crops"][5 + 3], parts[1][1][1])
    for k in ("labels", "global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "n_masked"):
        assert torch.equal(a[k], b[k]), k
    # Global views of two sizes: the per-sample checks give their error naming the sample.
    bad = StackedSamples(keys=["x0", "x1"], labels=[0, 1],
                         parts=[[torch.rand(2, 3, 8, 8), torch.rand(2, 3, 6, 6), torch.rand(2, 3, 4, 4)]])
    with pytest.raises(ValueError, match="sample 'x0': global view 1 has shape"):
        collate.collate_stacked(bad, torch.Generator())
