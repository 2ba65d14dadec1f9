"""Run-dir compatibility and checkpoint completeness (in-process, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_vil.config import ConfigError, load_config
from ssl_vil.train.build import build_optimizer, build_ssl_objective
from ssl_vil.train.run_dir import prepare_run_dir

TINY = ["data.train=unused", "schedule.total_steps=10", "optim.global_batch_size=8", "objective.ibot_weight=1",
        "objective.koleo_weight=0.1", "objective.dino_head.out_dim=64", "objective.ibot_head.out_dim=64",
        "objective.dino_head.hidden_dim=32", "objective.ibot_head.hidden_dim=32", "schedule.freeze_last_layer_steps=1",
        "schedule.warmup_steps=1"]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo_digits.yaml"


def test_incompatible_run_dir_is_refused_with_differing_keys(tmp_path: Path):
    cfg = load_config(RECIPE, TINY)
    prepare_run_dir(tmp_path, cfg, is_main=True)
    # Topology / logging changes resume fine.
    prepare_run_dir(tmp_path, load_config(RECIPE, TINY + ["data.num_workers=0", "logging.log_every_steps=5"]),
                    is_main=True)
    with pytest.raises(ConfigError) as info:
        prepare_run_dir(tmp_path, load_config(RECIPE, TINY + ["model.dim=96", "optim.lr=1e-3"]), is_main=True)
    msg = str(info.value)
    assert "model.dim: run has 64, now 96" in msg and "optim.lr: run has 0.002, now 0.001" in msg
    assert "data.num_workers" not in msg


def test_every_buffer_and_parameter_is_in_the_checkpointed_state():
    """A new buffer registered as non-persistent (or kept as a plain attribute tensor) would escape the checkpoint."""
    torch.manual_seed(0)
    obj = build_ssl_objective(load_config(RECIPE, TINY))
    state = obj.state_dict()
    names = {n for n, _ in obj.named_parameters()} | {n for n, _ in obj.named_buffers()}
    assert names == set(state), sorted(names ^ set(state))
    for module_name, module in obj.named_modules():
        for attr, value in vars(module).items():
            assert not isinstance(value, torch.Tensor) or attr.startswith("_"), \
                f"{module_name}.{attr} is a tensor attribute outside state_dict()"
    opt = build_optimizer(load_config(RECIPE, TINY), obj.student)
    trainable = {id(p) for p in obj.student.parameters() if p.requires_grad}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trainable == in_opt  # every trainable student parameter is optimised (and its moments saved)
