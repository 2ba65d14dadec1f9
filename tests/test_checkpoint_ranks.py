"""Two real gloo processes: only rank 0 writes, the other rank is released only after the save completed,
and a failed save on rank 0 does not leave the other rank hanging at the barrier."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import faultinject

CHILD_SRC = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from ssl_vil.checkpoint import CheckpointManager, CheckpointWriteError, latest_checkpoint

    rank, run_dir, store = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    manager = CheckpointManager(
        run_dir, keep_last=2, keep_every_steps=None, config_hash="h", world_size=2, git_sha=None,
        rank=rank, barrier=dist.barrier,
    )
    payload = {"model": {"w": torch.arange(1000.0)}}
    if rank == 0:
        time.sleep(1.0)  # rank 1 reaches save() first; without the barrier it would return to an empty dir
    path = manager.save(5, payload if rank == 0 else {})
    assert latest_checkpoint(run_dir) == path, (rank, latest_checkpoint(run_dir))
    try:
        manager.save(10, payload if rank == 0 else {})  # SSL_VIL_FAULT: disk full on step 10
        print(f"rank {rank} save10 returned", flush=True)
    except CheckpointWriteError as exc:
        print(f"rank {rank} save10 failed: {'no space' in str(exc)}", flush=True)
    dist.barrier()
    loaded = manager.load_latest()
    assert loaded.step == 5 and torch.equal(loaded.payload["model"]["w"], payload["model"]["w"])
    written = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    print(f"rank {rank} ok {written}", flush=True)
    from ssl_vil.infra.dist import leave_group
    leave_group()  # all ranks together
    """
)


@pytest.mark.slow
def test_only_rank_zero_writes_and_barrier_orders_the_ranks(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(CHILD_SRC)
    env = faultinject.child_env(fault="ckpt_write:step=10,enospc=1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(tmp_path / "run"), str(tmp_path / "store")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            outputs.append(out)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert outputs[0].splitlines() == ["rank 0 save10 failed: True", "rank 0 ok ['LATEST', 'step_00000005']"]
    assert outputs[1].splitlines() == ["rank 1 save10 returned", "rank 1 ok ['LATEST', 'step_00000005']"]
