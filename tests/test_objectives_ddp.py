"""The objective under DistributedDataParallel (2 gloo ranks, different seeds): replicas, teachers and
loss state stay identical."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from gloo_group import gloo_group


def _worker(rank: int, world: int, out_dir: str) -> None:
    with gloo_group(rank, world, os.path.join(out_dir, "rendezvous")):
        import timm
        from torch.nn.parallel import DistributedDataParallel as DDP

        import ssl_vil  # noqa: F401
        from ssl_vil.heads import DINOHeadConfig
        from ssl_vil.objectives.masking import MultiCropMaskCollate

        # A different initialisation on each rank, as a trainer seeding per rank would produce: DDP makes the
        # students equal, wrap_student must make the teachers (copies of each rank's own student) follow.
        torch.manual_seed(rank)
        backbone = timm.create_model(
            "vil2_tiny_patch16_224", img_size=32, patch_size=4, dim=64, depth=2, num_classes=0, mask_token=True
        )
        from ssl_vil.objectives import ObjectiveConfig, build_objective

        head = DINOHeadConfig(out_dim=64, hidden_dim=64, bottleneck_dim=16, batch_norm=False, norm_last_layer=False)
        obj = build_objective(backbone, ObjectiveConfig(dino_head=head))
        obj.wrap_student(lambda m: DDP(m))
        for (name, t), s in zip(obj.teacher.named_parameters(), obj.student.parameters()):
            assert torch.equal(t, s), f"rank {rank}: teacher {name} differs from the broadcast student"
        optimizer = torch.optim.AdamW([p for p in obj.student.parameters() if p.requires_grad], lr=1e-3)
        collate = MultiCropMaskCollate((8, 8), n_global=2)
        gen = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
        losses = []
        for _step in range(2):
            for _micro in range(2):
                samples = [
                    {
                        "key": f"r{rank}-{i}",
                        "label": i,
                        "views": [torch.randn(3, 32, 32, generator=gen) for _ in range(2)]
                        + [torch.randn(3, 16, 16, generator=gen) for _ in range(2)],
                    }
                    for i in range(4)
                ]
                out = obj(collate(samples, gen), teacher_temp=0.04)
                (out["loss"] / 2).backward()
                losses.append(out["loss"].item())
            optimizer.step()
            optimizer.zero_grad()
            obj.update_teacher(0.9)
            obj.commit_step()
        state = {k: v for k, v in obj.state_dict().items() if "running" not in k and "num_batches" not in k}
        torch.save({"state": state, "losses": losses}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_replicas_teachers_and_centers_stay_identical(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["losses"] != r1["losses"]  # the ranks saw different data
    assert r0["state"].keys() == r1["state"].keys()
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    # The centers moved, and identically on both ranks (all-reduced), although the ranks saw different data.
    assert r0["state"]["dino_center.center"].abs().sum() > 0 and r0["state"]["ibot_center.center"].abs().sum() > 0
