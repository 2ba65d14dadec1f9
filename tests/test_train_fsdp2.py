"""``train.distributed=fsdp2`` on CPU / gloo: FSDP2 (``fully_shard``) runs here, so it is tested for real.

* a 2-rank fsdp2 run gives the losses (and logged global gradient norms) of the same 2-rank DDP run within a tight
  tolerance, and its k-NN monitor (an unsharded copy of the teacher backbone) reports the same accuracy;
* its checkpoint is rank-agnostic: loaded at world size 1 (plain student, no process group), at world size 1
  sharded over a one-rank gloo group, and resumed by the CLI at world size 1 under ddp, the loaded student, teacher,
  centers and optimizer equal the saved full state bitwise; a DDP checkpoint loads into a 2-rank fsdp2 run bitwise;
* the EMA on local shards equals the EMA of the full tensors bitwise and issues no collective; gradient clipping on
  DTensor shards uses the global norm.

Why not bitwise against DDP: DDP all-reduces each rank's accumulated gradient once per step; FSDP2 reduce-scatters
every micro-batch (a different summation order, and its own pre/post division by the world size), and clipping
sums squared norms of shards, not of whole tensors. The differences are float rounding (~1e-7 relative in the
loss here); Adam turns the rounding noise of gradients that are ~0 (a bias right before a BatchNorm) into visible
parameter differences, so parameters are not compared across the two modes, only losses and gradient norms.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gloo_group import gloo_group
from ssl_vil.train.fsdp import by_index, by_name
from trainer_harness import (RECIPE, assert_tree_equal, final_payload, logs, losses, records, run_training,
                             tiny_overrides, write_shards)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 4
# Clipping far below the gradient norms (~100 here), so every step clips: a local (per-shard) norm would show.
EXTRA = ["optim.grad_accum_steps=2", "optim.clip_grad_norm=0.05", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path | list[str]]:
    """A 2-rank DDP run and the same 2-rank fsdp2 run (4 steps, 2 micro-batches each, k-NN monitor at the end)."""
    root = tmp_path_factory.mktemp("fsdp2")
    write_shards(root / "shards")
    write_shards(root / "knn_train", n_shards=2, per_shard=20)
    write_shards(root / "knn_val", n_shards=1, per_shard=30)
    base = tiny_overrides(root / "shards", total_steps=STEPS, workers=1) + EXTRA
    knn = ["knn_monitor.every_steps=4", f"knn_monitor.train={root / 'knn_train'}",
           f"knn_monitor.val={root / 'knn_val'}", "knn_monitor.k=[5]", "knn_monitor.batch_size=16"]
    out: dict[str, Path | list[str]] = {"root": root, "base": base}
    for mode in ("ddp", "fsdp2"):
        run = root / mode
        assert run_training(run, base + knn + [f"train.distributed={mode}"], world_size=2) == [0, 0], logs(run)
        out[mode] = run
    return out


def _step_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run) if "losses" in r}


def test_fsdp2_losses_match_ddp(runs):
    ddp, fsdp2 = _step_records(runs["ddp"]), _step_records(runs["fsdp2"])
    assert sorted(ddp) == sorted(fsdp2) == list(range(1, STEPS + 1))
    for step in ddp:
        for term, value in ddp[step]["losses"].items():
            assert fsdp2[step]["losses"][term] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, term)
        # The logged norm is the global pre-clip norm under both (per-shard norms would be ~1/sqrt(2) of it).
        assert fsdp2[step]["diagnostics"]["grad_norm"] == pytest.approx(ddp[step]["diagnostics"]["grad_norm"],
                                                                        rel=1e-5)
    knn = {m: [r for r in records(runs[m]) if r.get("event") == "knn"] for m in ("ddp", "fsdp2")}
    assert [e["step"] for e in knn["fsdp2"]] == [e["step"] for e in knn["ddp"]] == [STEPS]
    assert knn["fsdp2"][0]["knn_top1"] == pytest.approx(knn["ddp"][0]["knn_top1"], abs=100 / 30 + 1e-6)
    # The same checkpoint files either way: structure, key order and optimizer layout (parameters by index).
    a, b = final_payload(runs["ddp"]), final_payload(runs["fsdp2"])
    assert list(a["objective"]) == list(b["objective"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert list(a["optimizer"]["state"]) == list(b["optimizer"]["state"])
    assert (runs["fsdp2"] / "export" / "teacher_backbone.safetensors").exists()


# ---------------------------------------------------------------------------------------------- restore workers
def _restore_and_dump(rank: int, world: int, source: Path, overrides: list[str], out: Path) -> None:
    """Build the trainer's components for ``overrides`` at this world size, restore ``source``'s newest
    checkpoint through the trainer's checkpointer, and (rank 0) save the payload components' full state."""
    from ssl_vil.config import load_config
    from ssl_vil.infra.dist import DistInfo
    from ssl_vil.train import loop
    from ssl_vil.train.checkpointing import Progress
    from ssl_vil.train.fsdp import is_sharded
    from ssl_vil.train.preemption import PreemptionFlag

    cfg = load_config(RECIPE, overrides, world_size=world)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    t = loop._build(cfg, source, info, PreemptionFlag(announce=False))
    progress = Progress()
    assert t.checkpointer.restore(progress, rank) is not None
    state = {name: component.state_dict() for name, component in t.checkpointer.payload.items()}
    if rank == 0:
        torch.save({"state": state, "sharded": is_sharded(t.step.objective.student), "step": progress.step}, out)


def _world_size_1_worker(rank: int, source: str, overrides: list[str], out_dir: str) -> None:
    """World size 1 twice: without a process group (the plain student, as ``train.distributed=ddp`` runs), then
    sharded over a one-rank gloo group (every load goes through set_model/optimizer_state_dict)."""
    torch.set_num_threads(1)
    _restore_and_dump(0, 1, Path(source), overrides + ["train.distributed=ddp"], Path(out_dir) / "plain.pt")
    with gloo_group(0, 1, os.path.join(out_dir, "rendezvous")):
        _restore_and_dump(0, 1, Path(source), overrides + ["train.distributed=fsdp2"], Path(out_dir) / "sharded.pt")


def _world_size_2_worker(rank: int, source: str, overrides: list[str], out_dir: str) -> None:
    with gloo_group(rank, 2, os.path.join(out_dir, "rendezvous")):
        _restore_and_dump(rank, 2, Path(source), overrides + ["train.distributed=fsdp2"], Path(out_dir) / "ws2.pt")


def _assert_loaded_equals_saved(dump: Path, saved: dict, *, sharded: bool) -> None:
    loaded = torch.load(dump, weights_only=True)
    assert loaded["sharded"] is sharded and loaded["step"] == STEPS
    assert_tree_equal(saved["objective"], loaded["state"]["objective"], "objective")  # student, teacher, centers
    assert_tree_equal(saved["optimizer"], loaded["state"]["optimizer"], "optimizer")


def test_fsdp2_checkpoint_loads_at_world_size_1_bitwise(runs, tmp_path):
    saved = final_payload(runs["fsdp2"])
    mp.start_processes(_world_size_1_worker, args=(str(runs["fsdp2"]), runs["base"], str(tmp_path)),
                       nprocs=1, start_method="spawn")
    _assert_loaded_equals_saved(tmp_path / "plain.pt", saved, sharded=False)
    _assert_loaded_equals_saved(tmp_path / "sharded.pt", saved, sharded=True)


def test_ddp_checkpoint_loads_into_fsdp2_at_world_size_2_bitwise(runs, tmp_path):
    saved = final_payload(runs["ddp"])
    mp.start_processes(_world_size_2_worker, args=(str(runs["ddp"]), runs["base"], str(tmp_path)),
                       nprocs=2, start_method="spawn")
    _assert_loaded_equals_saved(tmp_path / "ws2.pt", saved, sharded=True)


def test_fsdp2_run_resumes_at_world_size_1_under_ddp(runs):
    """The CLI accepts the change of world size and of train.distributed and continues the run."""
    run = runs["root"] / "resumed_ws1"
    shutil.copytree(runs["fsdp2"], run)
    overrides = [o for o in runs["base"] if not o.startswith("schedule.total_steps")]
    codes = run_training(run, overrides + [f"schedule.total_steps={STEPS + 2}", "train.distributed=ddp"],
                         world_size=1)
    assert codes == [0], logs(run)
    resumed = [r for r in records(run) if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [STEPS]
    assert sorted(losses(run)) == list(range(1, STEPS + 3))


# ------------------------------------------------------------------------------------------- EMA and clipping
def _ema_and_clip_worker(rank: int, out_dir: str) -> None:
    with gloo_group(rank, 2, os.path.join(out_dir, "rendezvous")):
        import copy

        import timm
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import distribute_tensor
        from torch.distributed.tensor.debug import CommDebugMode

        import ssl_vil  # noqa: F401
        from ssl_vil.heads import DINOHeadConfig
        from ssl_vil.objectives import ObjectiveConfig, build_objective
        from ssl_vil.objectives.teacher import ema_update
        from ssl_vil.train.fsdp import shard_objective
        from ssl_vil.train.step import clip_per_submodule

        torch.manual_seed(0)  # the same full tensors on both ranks (as the trainer's shared init seed gives)
        backbone = timm.create_model("vil2_tiny_patch16_224", img_size=32, patch_size=4, dim=64, depth=2,
                                     num_classes=0, mask_token=True)
        head = DINOHeadConfig(out_dim=64, hidden_dim=64, bottleneck_dim=16)  # odd sizes: uneven shards too
        obj = build_objective(backbone, ObjectiveConfig(dino_head=head))
        with torch.no_grad():  # a student that differs from its teacher, so the EMA moves every element
            for p in obj.student.parameters():
                p.add_(torch.randn_like(p))
        reference = copy.deepcopy(obj)
        grads = {n: torch.randn_like(p) for n, p in obj.student.named_parameters() if p.requires_grad}

        shard_objective(obj, torch.device("cpu"))
        full = StateDictOptions(full_state_dict=True)
        with CommDebugMode() as comm:
            obj.update_teacher(0.9)
            obj.update_teacher(0.996)
        ema_collectives = comm.get_total_counts()
        ema_update(reference.teacher, reference.student, 0.9)
        ema_update(reference.teacher, reference.student, 0.996)
        teacher = get_model_state_dict(obj.teacher, options=full)
        for name, value in reference.teacher.state_dict().items():
            assert torch.equal(teacher[name], value), f"rank {rank}: EMA on shards differs at {name}"

        # Clipping: the sharded gradients are shards of the same full gradients as the reference's.
        for name, p in obj.student.named_parameters():
            if name in grads:
                p.grad = distribute_tensor(grads[name], p.device_mesh, p.placements)
        for name, p in reference.student.named_parameters():
            if name in grads:
                p.grad = grads[name].clone()
        unclipped = (clip_per_submodule(obj.student, None), clip_per_submodule(reference.student, None))
        norm_sharded = clip_per_submodule(obj.student, 1.0)
        norm_full = clip_per_submodule(reference.student, 1.0)
        clipped = {n: p.grad.full_tensor() for n, p in obj.student.named_parameters() if n in grads}
        if rank == 0:
            torch.save({"ema_collectives": ema_collectives, "norm_sharded": norm_sharded, "norm_full": norm_full,
                        "unclipped": unclipped,
                        "clipped": clipped,
                        "clipped_ref": {n: p.grad for n, p in reference.student.named_parameters() if n in grads}},
                       os.path.join(out_dir, "ema_clip.pt"))


def test_ema_on_shards_equals_full_ema_and_clipping_uses_the_global_norm(tmp_path):
    mp.start_processes(_ema_and_clip_worker, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    out = torch.load(tmp_path / "ema_clip.pt", weights_only=True)
    assert out["ema_collectives"] == 0  # shard i of the teacher from shard i of the student, no communication
    assert type(out["norm_sharded"]) is torch.Tensor  # a plain tensor for the step guard, not a DTensor
    # Same value up to summation order (sums of squared shard norms vs. whole-tensor norms).
    torch.testing.assert_close(out["norm_sharded"], out["norm_full"], rtol=1e-6, atol=0)
    torch.testing.assert_close(out["unclipped"][0], out["unclipped"][1], rtol=1e-6, atol=0)  # clip_grad_norm=null
    assert type(out["unclipped"][0]) is torch.Tensor
    for name, ref in out["clipped_ref"].items():
        torch.testing.assert_close(out["clipped"][name], ref, rtol=1e-5, atol=1e-8, msg=name)


# -------------------------------------------------------------------------------------------------- no processes
def test_optimizer_state_layout_round_trip():
    """Name-keyed (get_optimizer_state_dict) <-> index-keyed (Optimizer.state_dict) is lossless and gives torch's
    own layout."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    groups = [{"params": [model[0].weight, model[1].weight]}, {"params": [model[0].bias, model[1].bias], "lr": 0.5}]
    opt = torch.optim.AdamW(groups, lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    names = ["0.weight", "1.weight", "0.bias", "1.bias"]
    native = opt.state_dict()
    named = by_name(native, names)
    assert list(named["state"]) == names and named["param_groups"][1]["params"] == ["0.bias", "1.bias"]
    assert_tree_equal(by_index(named), native)
    with pytest.raises(ValueError, match="has 4 parameters, the optimizer 3"):
        by_name(native, names[:3])


def test_fsdp2_with_fp16_is_refused():
    from ssl_vil.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train\.distributed: got 'fsdp2'.*fp16"):
        load_config(RECIPE, ["train.distributed=fsdp2", "train.precision=fp16"], world_size=2)
