"""``train.compile=true`` through the trainer (inductor on CPU): exact resume and the step guards.

The tiny recipe is trained compiled at world size 1: an uninterrupted 6-step run is the reference; a second run is
SIGKILLed after step 3 (checkpoints every 2 steps) and relaunched, and its per-step losses and final checkpoint
(student, teacher, centers, optimizer, train state) must equal the reference *bitwise*. That holds because the
compiled code is deterministic on CPU and the resumed process compiles the same single graph (the student's
forward has fixed shapes here: no recompilation, no static-vs-dynamic kernel switch after the resume).
A third run injects a NaN loss and a NaN gradient from outside the compiled region (the fault hooks wrap the
objective's forward and the clipping): both steps are skipped with the state bitwise unchanged.

Cost: the first compile of the whole student (forward and backward) takes ~170 s on a 2-core CPU with a cold
inductor cache; the runs after it hit the FX graph cache (~12 s each). Hence ``slow`` (it runs in CI too).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ssl_vil.checkpoint import CheckpointManager, latest_checkpoint
from trainer_harness import (assert_tree_equal, final_payload, launch, logs, losses, records, tiny_overrides,
                             wait_all, write_shards)

STEPS = 6
# TORCH_LOGS=dynamo puts dynamo's "calling compiler function inductor" line in the rank log: proof that the student
# really went through the compiler (also on an FX-graph-cache hit).
COMPILE_ENV = {"TORCH_LOGS": "dynamo"}
COMPILED = "calling compiler function inductor"


def _run(run: Path, overrides: list[str], fault: str | None = None) -> list[int]:
    return wait_all(launch(run, overrides, world_size=1, fault=fault, extra_env=COMPILE_ENV), timeout=900)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    write_shards(root / "shards")
    overrides = tiny_overrides(root / "shards", total_steps=STEPS, workers=1) + [
        "train.compile=true", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
    ref = root / "reference"
    started = time.monotonic()
    assert _run(ref, overrides) == [0], logs(ref)
    print(f"compiled reference run: {time.monotonic() - started:.0f} s")
    assert COMPILED in logs(ref), "train.compile=true did not compile the student"
    return root, overrides, ref


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_compiled_run_resumes_bitwise(setup):
    root, overrides, ref = setup
    run = root / "killed"
    # SIGKILL after step 3 returned: the newest checkpoint is step 2, and step 3 is computed again after the resume.
    assert _run(run, overrides, fault="kill:step=3,rank=0,at=mid_step") == [-9], logs(run)
    assert _run(run, overrides) == [0], logs(run)
    assert [r["step"] for r in records(run) if r.get("event") == "resumed"] == [2]
    assert logs(run).count(COMPILED) >= 2  # both processes compiled
    assert losses(run) == losses(ref)  # exact float equality, steps 1..6
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    a, b = final_payload(ref), final_payload(run)
    assert latest_checkpoint(run).name == latest_checkpoint(ref).name == f"step_{STEPS:08d}"
    for key in ("objective", "optimizer", "train_state"):
        assert_tree_equal(a[key], b[key], key)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_guards_skip_nonfinite_steps_under_compile(setup):
    root, overrides, ref = setup
    run = root / "guarded"
    # 0-based step indices: a NaN in the iBOT term at the 3rd step, a NaN gradient at the 5th.
    fault = "loss:step=2,rank=0,term=ibot,value=nan;grad:step=4,rank=0"
    assert _run(run, overrides + ["checkpoint.every_steps=1"], fault=fault) == [0], logs(run)
    assert COMPILED in logs(run)
    steps = {r["step"]: r for r in records(run) if "losses" in r}
    assert [s for s, r in steps.items() if r["skipped"]] == [3, 5]
    assert [steps[s]["losses"]["loss"] for s in (1, 2)] == [losses(ref)[s] for s in (1, 2)]  # before any fault

    def state(step: int) -> dict:
        return CheckpointManager.load_folder(run / "checkpoints" / f"step_{step:08d}").payload

    for skipped in (3, 5):
        before, after = state(skipped - 1), state(skipped)
        assert_tree_equal(before["objective"], after["objective"], "objective")
        assert_tree_equal(before["optimizer"]["state"], after["optimizer"]["state"], "optimizer moments")
    assert state(STEPS)["train_state"]["finite_guard"]["skipped_total"] == 2
    assert [e["step"] for e in records(run) if e.get("event") == "step_skipped"] == [3, 5]


# ------------------------------------------------------------------------------------ wrapping (nothing compiled)
def _tiny_objective():
    import timm

    import ssl_vil  # noqa: F401
    from ssl_vil.heads import DINOHeadConfig
    from ssl_vil.objectives import ObjectiveConfig, build_objective

    torch.manual_seed(0)
    backbone = timm.create_model("vil2_tiny_patch16_224", img_size=32, patch_size=4, dim=64, depth=2, num_classes=0,
                                 mask_token=True)
    return build_objective(backbone, ObjectiveConfig(dino_head=DINOHeadConfig(out_dim=64, hidden_dim=64,
                                                                              bottleneck_dim=16)))


class _Replica(torch.nn.Module):
    """Stands in for DistributedDataParallel (which needs a process group): a wrapper holding ``.module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_compile_wraps_the_ddp_wrapper_not_the_bare_student():
    """``torch.compile`` must wrap what the forward goes through: compiling the bare student would route the
    forward around DDP, and no gradient would be all-reduced."""
    obj = _tiny_objective()
    replica = obj.wrap_student(_Replica)
    compiled = obj.wrap_student(torch.compile)  # lazy: nothing is compiled until called
    assert compiled._orig_mod is replica and replica.module is obj.student
    assert obj._student_forward is compiled


def test_clipping_is_per_submodule_under_compile():
    """A compiled student's only child is ``_orig_mod``; clipping still treats backbone and heads separately."""
    from ssl_vil.train.step import clip_per_submodule

    plain, compiled_obj = _tiny_objective(), _tiny_objective()
    compiled = compiled_obj.wrap_student(torch.compile)
    gen = torch.Generator().manual_seed(1)
    for a, b in zip(plain.student.parameters(), compiled_obj.student.parameters()):
        if a.requires_grad:
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
    assert torch.equal(clip_per_submodule(compiled, 0.5), clip_per_submodule(plain.student, 0.5))
    for a, b in zip(plain.student.parameters(), compiled_obj.student.parameters()):
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
