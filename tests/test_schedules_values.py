"""Schedules as pure functions of the step: exact values against closed forms."""

from __future__ import annotations

import math

import pytest

from ssl_vil.config import ConfigError, load_config
from ssl_vil.backbones.drop_path import drop_path_rates
from ssl_vil.schedules import (
    ema_momentum_at,
    last_layer_lr_multiplier,
    lr_at,
    scale_lr,
    teacher_temp_at,
    weight_decay_at,
    warmup_cosine,
)

# A resolved run config: the schedules read its steps from ``derived`` and their values from optim / objective.
CFG = load_config(world_size=1, overrides=[
    "schedule.total_steps=1000", "optim.lr=4e-3", "optim.lr_scaling=none", "optim.min_lr=1e-6",
    "schedule.warmup_steps=100", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.momentum_start=0.992",
    "optim.momentum_end=1.0", "objective.warmup_teacher_temp=0.04", "objective.teacher_temp=0.07",
    "schedule.teacher_temp_warmup_steps=300", "schedule.freeze_last_layer_steps=50",
])


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (25, 4e-3 * 0.25),
        (99, 4e-3 * 0.99),
        (100, 4e-3),
        (325, 1e-6 + 0.5 * (4e-3 - 1e-6) * (1 + math.cos(math.pi * 0.25))),
        (550, 1e-6 + 0.5 * (4e-3 - 1e-6)),
        (1000, 1e-6),
        (5000, 1e-6),
    ],
)
def test_lr_warmup_then_cosine(step, expected):
    assert lr_at(step, CFG) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("step", [0, 1, 250, 500, 999, 1000, 2000])
def test_weight_decay_and_momentum_cosines(step):
    progress = min(step, 1000) / 1000
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    assert weight_decay_at(step, CFG) == pytest.approx(0.4 + (0.04 - 0.4) * cosine, rel=1e-12)
    assert ema_momentum_at(step, CFG) == pytest.approx(1.0 + (0.992 - 1.0) * cosine, rel=1e-12)


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.04), (150, 0.055), (299, 0.04 + 0.03 * 299 / 300), (300, 0.07), (999, 0.07)]
)
def test_teacher_temperature_warmup(step, expected):
    assert teacher_temp_at(step, CFG) == pytest.approx(expected, rel=1e-12)
    no_warmup = load_config(overrides=["schedule.total_steps=10"], world_size=1)
    assert teacher_temp_at(step, no_warmup) == 0.07  # no warmup: constant


def test_last_layer_frozen_for_first_steps():
    assert [last_layer_lr_multiplier(s, 50) for s in (0, 49, 50, 51)] == [0.0, 0.0, 1.0, 1.0]
    assert last_layer_lr_multiplier(0, 0) == 1.0


def test_batch_scaling_rules():
    assert scale_lr(5e-4, 1024, reference_batch_size=256, rule="linear") == pytest.approx(2e-3)
    assert scale_lr(4e-3, 256, reference_batch_size=1024, rule="sqrt") == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="'linear' or 'sqrt'"):
        scale_lr(1.0, 2, reference_batch_size=1, rule="cubic")


def test_drop_path_rates_linear_ramp_and_uniform():
    assert drop_path_rates(4, 0.3, "linear") == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert drop_path_rates(3, 0.3, "uniform") == [0.3, 0.3, 0.3]
    assert drop_path_rates(1, 0.2, "linear") == [0.2]


def test_schedules_are_pure():
    assert [lr_at(s, CFG) for s in range(0, 1000, 37)] == [lr_at(s, CFG) for s in range(0, 1000, 37)]
    assert warmup_cosine(10, total_steps=10, peak_value=1.0, final_value=0.5, warmup_steps=10) == 1.0


def test_config_validation():
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps: got 11, expected at most the run length \(10 "):
        load_config(overrides=["schedule.total_steps=10", "schedule.warmup_steps=11"], world_size=1)
    with pytest.raises(ConfigError, match="schedule.total_steps: got 0, expected a positive number"):
        load_config(overrides=["schedule.total_steps=0"], world_size=1)
