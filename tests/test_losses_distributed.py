"""Sinkhorn-Knopp and center commits across 2 gloo ranks equal the single-process result on the full batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from gloo_group import gloo_group
from ssl_vil.losses import EMACenter, sinkhorn_knopp


def _full_batch():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(12, 20, generator=g, dtype=torch.float64)
    valid = torch.ones(12, dtype=torch.bool)
    valid[[2, 9, 10]] = False
    return logits, valid


def _worker(rank: int, world: int, out_dir: str) -> None:
    with gloo_group(rank, world, os.path.join(out_dir, "rendezvous")):
        logits, valid = _full_batch()
        # Uneven split: rank 0 holds 5 rows, rank 1 holds 7.
        rows = slice(0, 5) if rank == 0 else slice(5, 12)
        q = sinkhorn_knopp(logits[rows], 0.07, 3, valid=valid[rows])
        center = EMACenter(20, momentum=0.8).double()
        center.accumulate(logits[rows][: 2 + rank], valid=valid[rows][: 2 + rank])
        center.accumulate(logits[rows][2 + rank :], valid=valid[rows][2 + rank :])
        center.commit()
        torch.save({"q": q, "center": center.center}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_sinkhorn_and_center_all_reduce_match_full_batch(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    logits, valid = _full_batch()
    full_q = sinkhorn_knopp(logits, 0.07, 3, valid=valid)
    torch.testing.assert_close(torch.cat([r0["q"], r1["q"]]), full_q, rtol=1e-12, atol=1e-12)
    center = EMACenter(20, momentum=0.8).double()
    center.accumulate(logits, valid=valid)
    center.commit()
    torch.testing.assert_close(r0["center"], center.center, rtol=1e-12, atol=1e-12)
    assert torch.equal(r0["center"], r1["center"])
