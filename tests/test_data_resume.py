"""Exact resume of the training stream in new processes, across worker counts and topologies (same global batch)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from synthetic_shards import synthetic_key, write_synthetic_shards

SIZES = [5, 40, 17, 3, 60, 22, 9, 31]  # 187 samples; global batch 4 -> 47 steps, one padding entry
ALL_KEYS = {synthetic_key("syn", s, i) for s, n in enumerate(SIZES) for i in range(n)}

# `run` drives `world` simulated ranks side by side, optionally from a saved cursor, for `n` global batches (-1: to
# the end of the epoch), and records every global batch as keys, padding flags and a digest of each sample's views.
RUNNER = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np, torch
    from ssl_vil.data import build_train_stream

    def crop(image, generator):
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
        i, j = torch.randint(0, 5, (2,), generator=generator).tolist()
        scale = torch.rand((), generator=generator)
        return [pixels[:, i:i + 12, j:j + 12] * scale, pixels[:, ::2, ::2].contiguous()]

    def run(shard_dir, world, per_rank, workers, n, state):
        streams = [build_train_stream(shard_dir, batch_size=per_rank, seed=11, rank=r, world_size=world,
                                      num_workers=workers, transform=crop, shuffle_window_samples=8)
                   for r in range(world)]
        if state is not None:
            for s in streams:
                s.load_state_dict(state)
        records = []
        iters = [iter(s) for s in streams]
        while n < 0 or len(records) < n:
            batches = [next(it, None) for it in iters]
            if batches[0] is None:
                assert all(b is None for b in batches), "ranks ran different numbers of steps"
                if n < 0:
                    break
                iters = [iter(s) for s in streams]  # next epoch
                continue
            digests = []
            for b in batches:
                for i in range(len(b["keys"])):
                    h = hashlib.sha256()
                    for view in b["views"]:
                        h.update(view[i].contiguous().numpy().tobytes())
                    digests.append(h.hexdigest()[:16])
            records.append({
                "epoch": batches[0]["epoch"], "index": batches[0]["batch_in_epoch"],
                "keys": [k for b in batches for k in b["keys"]],
                "padded": [p for b in batches for p in b["padded"].tolist()],
                "digests": digests,
            })
        for it in iters:
            it.close()
        states = [s.state_dict() for s in streams]
        assert all(st == states[0] for st in states), "cursor differs between ranks"
        return {"records": records, "state": states[0]}

    if __name__ == "__main__":
        shard_dir, world, per_rank, workers, n, state_in, out = sys.argv[1:]
        state = json.load(open(state_in)) if state_in else None
        result = run(shard_dir, int(world), int(per_rank), int(workers), int(n), state)
        json.dump(result, open(out, "w"))
    """
)


def _run(tmp: Path, shard_dir: Path, tag: str, world: int, per_rank: int, workers: int, n: int,
         state_in: Path | None, hashseed: str) -> dict:
    script = tmp / "runner.py"
    script.write_text(RUNNER)
    out = tmp / f"{tag}.json"
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    cmd = [sys.executable, str(script), str(shard_dir), str(world), str(per_rank), str(workers), str(n),
           str(state_in or ""), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_in_new_processes_across_workers_and_topologies(tmp_path):
    shard_dir = tmp_path / "shards"
    write_synthetic_shards(shard_dir, SIZES)
    steps = -(-sum(SIZES) // 4)
    runner: dict = {}
    exec(RUNNER, runner)  # the uninterrupted reference runs in this process
    reference = json.loads(json.dumps(runner["run"](str(shard_dir), 2, 2, 2, steps + 3, None)))["records"]
    assert [r["epoch"] for r in reference] == [0] * steps + [1] * 3

    def save(state: dict, name: str) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(state))
        return path

    a = _run(tmp_path, shard_dir, "a", 2, 2, 2, 10, None, "2")  # 2 ranks x 2 per rank, 2 workers
    assert (a["state"]["epoch"], a["state"]["batches_consumed"]) == (0, 10)
    b = _run(tmp_path, shard_dir, "b", 1, 4, 3, 15, save(a["state"], "a.state"), "3")  # 1 x 4, 3 workers
    assert (b["state"]["epoch"], b["state"]["batches_consumed"]) == (0, 25)
    c = _run(tmp_path, shard_dir, "c", 4, 1, 1, -1, save(b["state"], "b.state"), "4")  # 4 x 1, 1 worker each
    assert (c["state"]["epoch"], c["state"]["batches_consumed"]) == (1, 0)
    d = _run(tmp_path, shard_dir, "d", 2, 2, 0, 3, save(c["state"], "c.state"), "5")  # next epoch, in-process

    resumed = a["records"] + b["records"] + c["records"] + d["records"]
    assert len(resumed) == len(reference)
    for got, want in zip(resumed, reference):
        assert got == want, f"batch {want['epoch']}/{want['index']} differs after resume"
    epoch0 = collections.Counter(
        k for r in a["records"] + b["records"] + c["records"] for k, p in zip(r["keys"], r["padded"]) if not p
    )
    assert set(epoch0) == ALL_KEYS and max(epoch0.values()) == 1
    assert sum(p for r in a["records"] + b["records"] + c["records"] for p in r["padded"]) == steps * 4 - sum(SIZES)
