"""FiniteGuard: one MIN all-reduce makes skip / halt decisions identical on all ranks (real 2-process gloo).

The multi-process test runs this file as a script (``python test_guards_finite.py finite_worker RANK ...``), so
the worker code sits next to the assertions it feeds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ssl_vil.train.guards import FiniteGuard, NonFiniteError

TERMS = ("loss", "dino", "ibot", "koleo")

# step -> {rank: [quantities made non-finite on that rank]}; "grad_norm" is the grad norm.
SKIP_FAULTS = {
    1: {1: ["ibot"]},
    3: {0: ["koleo"]},
    4: {1: ["grad_norm"]},
    5: {0: ["dino"], 1: ["dino"]},
    6: {1: ["ibot"]},  # 4th consecutive bad step with max_consecutive=3 -> raise
}
HALT_FAULTS = {2: {1: ["dino"]}}


def make_step(step: int, rank: int, faults: dict[int, dict[int, list[str]]]):
    """Loss terms, grad norm and batch keys of one step on one rank, with the planted NaN / inf."""
    bad = faults.get(step, {}).get(rank, [])
    # NaN for odd steps, +inf for even ones: both must be caught.
    poison = math.nan if step % 2 else math.inf
    terms = {name: torch.tensor(poison if name in bad else 1.0 + 0.1 * step) for name in TERMS}
    grad_norm = torch.tensor(poison if "grad_norm" in bad else 0.5)
    keys = [f"shard{rank:02d}/step{step:03d}/{i}" for i in range(4)]
    return terms, grad_norm, keys


def run_policy(guard: FiniteGuard, rank: int, faults, n_steps: int) -> dict:
    results, reports = [], []
    try:
        for step in range(n_steps):
            terms, grad_norm, keys = make_step(step, rank, faults)
            results.append(guard.check(terms, grad_norm, step=step, batch_keys=keys))
            reports.append(guard.last_report)
    except NonFiniteError as err:
        return {"results": results, "reports": reports, "error": str(err), "error_step": err.step,
                "error_bad": err.bad, **guard.state_dict()}
    return {"results": results, "reports": reports, "error": None, **guard.state_dict()}


def finite_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    out = Path(out_dir)
    skip = run_policy(FiniteGuard("skip", 3, out / "skip", rank), rank, SKIP_FAULTS, n_steps=10)
    halt = run_policy(FiniteGuard("halt", 3, out / "halt", rank), rank, HALT_FAULTS, n_steps=10)
    (out / f"finite_rank{rank}.json").write_text(json.dumps({"skip": skip, "halt": halt}))
    from ssl_vil.infra.dist import leave_group
    leave_group()  # all ranks together


def run_ranks(worker: str, tmp_path: Path, world: int = 2, timeout_s: float = 90) -> list[subprocess.CompletedProcess]:
    store = tmp_path / "store"
    procs = [
        subprocess.Popen([sys.executable, __file__, worker, str(r), str(world), str(store), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    try:
        outs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


@pytest.mark.slow
def test_two_ranks_agree_on_skip_and_halt(tmp_path):
    run_ranks("finite_worker", tmp_path)
    r0, r1 = (json.loads((tmp_path / f"finite_rank{r}.json").read_text()) for r in range(2))

    # skip: both ranks see the same verdicts, although each fault was planted on one rank only.
    for r in (r0, r1):
        assert r["skip"]["results"] == [True, False, True, False, False, False]
        assert r["skip"]["reports"] == [{}, {"ibot": [1]}, {}, {"koleo": [0]}, {"grad_norm": [1]}, {"dino": [0, 1]}]
        assert r["skip"]["error_step"] == 6
        assert r["skip"]["error_bad"] == {"ibot": [1]}
        assert r["skip"]["skipped_total"] == 5 and r["skip"]["consecutive"] == 4
    assert r0["skip"]["error"] == r1["skip"]["error"]
    msg = r0["skip"]["error"]
    assert "step 6" in msg and "ibot on rank 1" in msg and "policy skip" in msg and "max_consecutive=3" in msg
    # Only the rank that saw the bad value writes its batch keys.
    assert sorted(p.name for p in (tmp_path / "skip").iterdir()) == ["nonfinite_step6_rank1.json"]
    keys = json.loads((tmp_path / "skip" / "nonfinite_step6_rank1.json").read_text())
    assert keys == {"step": 6, "rank": 1, "policy": "skip", "terms": ["ibot"],
                    "batch_keys": [f"shard01/step006/{i}" for i in range(4)]}

    # halt: raises at the first bad step on both ranks, naming term, rank and step.
    for r in (r0, r1):
        assert r["halt"]["results"] == [True, True]
        assert r["halt"]["error_step"] == 2 and r["halt"]["error_bad"] == {"dino": [1]}
    assert r0["halt"]["error"] == r1["halt"]["error"]
    assert "step 2" in r0["halt"]["error"] and "dino on rank 1" in r0["halt"]["error"] and "halt" in r0["halt"]["error"]
    assert sorted(p.name for p in (tmp_path / "halt").iterdir()) == ["nonfinite_step2_rank1.json"]
    keys = json.loads((tmp_path / "halt" / "nonfinite_step2_rank1.json").read_text())
    assert keys["batch_keys"] == [f"shard01/step002/{i}" for i in range(4)] and keys["terms"] == ["dino"]


def test_single_process_skip_counts_and_resets(tmp_path):
    guard = FiniteGuard("skip", max_consecutive=2, run_dir=tmp_path, rank=3)
    verdicts = []
    for step, bad in enumerate([[], ["koleo"], ["grad_norm"], [], ["dino"], ["dino"]]):
        terms = {n: torch.tensor(math.nan if n in bad else 1.0) for n in TERMS}
        grad_norm = torch.tensor(math.inf if "grad_norm" in bad else 1.0)
        verdicts.append(guard.check(terms, grad_norm, step=step, batch_keys=[f"k{step}"]))
    assert verdicts == [True, False, False, True, False, False]
    assert guard.last_report == {"dino": [3]}
    assert guard.state_dict() == {"skipped_total": 4, "consecutive": 2}
    with pytest.raises(NonFiniteError, match=r"step 6 \(policy skip\): loss on rank 3"):
        guard.check({"loss": torch.tensor([1.0, math.nan])}, torch.tensor(1.0), step=6, batch_keys=["k6"])
    assert json.loads((tmp_path / "nonfinite_step6_rank3.json").read_text())["batch_keys"] == ["k6"]

    resumed = FiniteGuard("skip", max_consecutive=2, run_dir=tmp_path, rank=3)
    resumed.load_state_dict({"skipped_total": 4, "consecutive": 2})
    with pytest.raises(NonFiniteError, match="3 bad steps in a row"):
        resumed.check({"loss": torch.tensor(math.nan)}, torch.tensor(1.0), step=6, batch_keys=[])


def test_halt_raises_before_anything_else(tmp_path):
    guard = FiniteGuard("halt", max_consecutive=0, run_dir=tmp_path, rank=0)
    assert guard.check({"loss": torch.tensor(2.0)}, torch.tensor(1.0), step=0, batch_keys=["a"])
    with pytest.raises(NonFiniteError, match="grad_norm on rank 0") as info:
        guard.check({"loss": torch.tensor(2.0)}, torch.tensor(math.nan), step=1, batch_keys=["b", "c"])
    assert info.value.step == 1 and info.value.bad == {"grad_norm": [0]}
    assert json.loads((tmp_path / "nonfinite_step1_rank0.json").read_text())["batch_keys"] == ["b", "c"]


def test_rejects_unknown_policy(tmp_path):
    with pytest.raises(ValueError, match="'skip' or 'halt'"):
        FiniteGuard("ignore", 3, tmp_path, 0)  # type: ignore[arg-type]


if __name__ == "__main__":
    globals()[sys.argv[1]](int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
