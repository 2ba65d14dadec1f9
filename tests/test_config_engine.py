"""The one config engine: typed dataclass trees from YAML + overrides, whole-tree did-you-mean, node checks,
and the run config composed of the components' own config classes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ssl_vil.config import ConfigError, RunConfig, engine, load_config
from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@dataclass(kw_only=True, slots=True)
class Leaf(Config):
    width: int = 4
    ratio: tuple[float, float] = (0.1, 0.5)
    mode: Literal["block", "random"] = "block"

    def validate(self) -> None:
        if self.width <= 0:
            raise invalid("width", self.width, "a positive integer")


@dataclass(kw_only=True, slots=True)
class Branch(Config):
    main: Leaf = field(default_factory=Leaf)
    extra: Leaf | None = None
    rate: float = 1.0
    names: list[str] = field(default_factory=list)


@dataclass(kw_only=True, slots=True)
class Root(Config):
    branch: Branch = field(default_factory=Branch)
    steps: int = 10

    def validate(self) -> None:
        if self.branch.main.width > self.steps:
            raise invalid("branch.main.width", self.branch.main.width, f"at most steps={self.steps}")


def test_build_over_defaults_with_coercion():
    cfg = engine.build(Root, {"branch": {"main": {"ratio": [0, 1]}, "rate": 2, "extra": {"width": 2}}})
    assert cfg.branch.main == Leaf(ratio=(0.0, 1.0)) and cfg.branch.extra == Leaf(width=2)
    assert isinstance(cfg.branch.rate, float) and cfg.steps == 10
    assert engine.build(Root, {"branch": {"extra": None}}).branch.extra is None
    assert engine.build(Root, {"branch": {"rate": "1e-3"}}).branch.rate == 1e-3  # YAML 1.1 float string


@pytest.mark.parametrize(("data", "message"), [
    ({"branch": {"main": {"widht": 3}}}, "branch.main.widht: unknown key; did you mean branch.main.width?"),
    ({"branch": {"width": 3}}, "branch.width: unknown key; did you mean branch.main.width or branch.extra.width?"),
    ({"brnch": {}}, "brnch: unknown key; did you mean branch?"),
    ({"zzz": 1}, "zzz: unknown key; valid keys here: branch, steps"),
    ({"branch": {"main": {"mode": "blok"}}}, "branch.main.mode: got 'blok', expected one of 'block', 'random' "
                                             "(did you mean 'block'?)"),
    ({"branch": {"main": {"ratio": [0.1]}}}, "branch.main.ratio: got [0.1], expected a list of 2 float"),
    ({"branch": {"rate": True}}, "branch.rate: got True, expected float"),
    ({"steps": 2.5}, "steps: got 2.5, expected int"),
    ({"branch": {"main": 3}}, "branch.main: got 3, expected a mapping"),
    ({"branch": {"extra": {"width": 0}}}, "branch.extra.width: got 0, expected a positive integer"),
    ({"steps": 3}, "branch.main.width: got 4, expected at most steps=3"),
])
def test_errors_name_the_full_dotted_key(data, message):
    with pytest.raises(ConfigError) as info:
        engine.build(Root, data)
    assert str(info.value) == message


def test_direct_construction_checks_with_relative_keys():
    with pytest.raises(ConfigError, match="^width: got 0, expected a positive integer$"):
        Leaf(width=0)
    with pytest.raises(ConfigError, match="^mode: got 'x', expected one of 'block', 'random'$"):
        Leaf(mode="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="^main: got 1, expected a Leaf$"):
        Branch(main=1)  # type: ignore[arg-type]
    assert Leaf(ratio=[0, 1]).ratio == (0.0, 1.0)  # type: ignore[arg-type]


def test_load_layers_yaml_and_overrides_and_round_trips(tmp_path: Path):
    p = tmp_path / "r.yaml"
    p.write_text("branch: {rate: 3.0, main: {width: 2}}\nsteps: 20\n")
    cfg = engine.load(Root, p, ["branch.main.mode=random", "branch.names=[a, b]"])
    assert (cfg.branch.rate, cfg.branch.main.width, cfg.branch.main.mode, cfg.steps) == (3.0, 2, "random", 20)
    assert cfg.branch.names == ["a", "b"]
    p.write_text(engine.to_yaml(cfg))
    assert engine.load(Root, p) == cfg
    with pytest.raises(ConfigError, match="conflicts with an earlier override"):
        engine.load(Root, None, ["branch=1", "branch.rate=2"])
    with pytest.raises(ConfigError, match="steps: unknown key; renamed"):
        engine.load(Root, None, ["branch.steps=1"], moved={"branch.steps": "renamed"})
    assert [k for k, _, _ in engine.diff(cfg, engine.load(Root, p, ["steps=30"]))] == ["steps"]


def test_run_config_sections_are_the_component_classes():
    from ssl_vil.augment import AugmentConfig
    from ssl_vil.checkpoint.config import CheckpointConfig
    from ssl_vil.heads import DINOHeadConfig
    from ssl_vil.objectives.masking import MaskingConfig
    from ssl_vil.objectives import ObjectiveConfig
    from ssl_vil.schedules import ScheduleConfig
    from ssl_vil.train.config import GuardConfig, KnnMonitorConfig

    cfg = load_config(RECIPES / "vil2_s16_dinov2_in1k.yaml", world_size=1)
    assert type(cfg.objective) is ObjectiveConfig and type(cfg.objective.dino_head) is DINOHeadConfig
    assert type(cfg.masking) is MaskingConfig and type(cfg.data.augment) is AugmentConfig
    assert type(cfg.schedule) is ScheduleConfig and type(cfg.checkpoint) is CheckpointConfig
    assert type(cfg.guards) is GuardConfig and type(cfg.knn_monitor) is KnnMonitorConfig


def test_the_recipe_states_the_method():
    """DINO / iBOT / DINOv2 are loss weights in the recipe; the built objective is what the config says."""
    from ssl_vil.train.build import build_ssl_objective

    expected = {"vil2_s16_dino_in1k": (0.0, 0.0), "vil2_s16_ibot_in1k": (1.0, 0.0), "vil2_s16_dinov2_in1k": (1.0, 0.1)}
    for name, weights in expected.items():
        o = load_config(RECIPES / f"{name}.yaml", world_size=1).objective
        assert (o.ibot_weight, o.koleo_weight) == weights, name
    demo = RECIPES / "demo_digits.yaml"
    dino = build_ssl_objective(load_config(demo, world_size=1))
    assert dino.student.backbone.mask_token is None and dino.student.ibot_head is None
    ibot = build_ssl_objective(load_config(demo, ["objective.ibot_weight=1"], world_size=1))
    assert ibot.student.backbone.mask_token is not None and ibot.student.ibot_head is not None
    with pytest.raises(ConfigError, match="objective.dino_weight: got 0.0"):
        load_config(demo, ["objective.dino_weight=0"], world_size=1)


def test_finetune_config_uses_the_same_engine():
    from ssl_vil.eval import finetune_config

    assert not any(hasattr(finetune_config, name) for name in ("_coerce", "_build", "_merge"))
    with pytest.raises(ConfigError, match="optim.train_epochs: unknown key; did you mean schedule.train_epochs?"):
        finetune_config.load_finetune_config(RECIPES / "finetune_digits.yaml", ["optim.train_epochs=3"])


def test_an_override_in_one_unit_replaces_the_recipes_other_unit(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schedule:\n  total_epochs: 100\n  warmup_epochs: 10\n  teacher_temp_warmup_samples: 640\n"
                      "data:\n  samples_per_epoch: 1000\n")
    cfg = engine.load(RunConfig, recipe, ["schedule.total_steps=50", "schedule.warmup_samples=64"])
    s = cfg.schedule
    assert (s.total_steps, s.total_epochs, s.warmup_samples, s.warmup_epochs) == (50, None, 64, None)
    assert (s.teacher_temp_warmup_samples, s.teacher_temp_warmup_steps) == (640, None)  # not overridden: kept
    # two units on the command line are still two units
    with pytest.raises(ConfigError, match=r"schedule\.total_\*.*total_steps=50, total_epochs=3"):
        engine.load(RunConfig, recipe, ["schedule.total_steps=50", "schedule.total_epochs=3"])
