"""data.augment.preset: every crop setting the config leaves unstated comes from the preset, is written into the
resolved config (what RUN/config.yaml holds) and is what the trainer's transform uses; stated values win."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ssl_vil.augment import DigitsMultiCrop, MultiCropTransform, multicrop_from_config
from ssl_vil.config import ConfigError, load_config, to_yaml

BASE = ["schedule.total_steps=100", "optim.global_batch_size=64"]
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

# The papers' values (DINO; iBOT's released ViT-S/B arguments; DINOv2) at 224 px, patch 16.
EXPECTED = {
    "dino": {"global_size": 224, "local_size": 96, "n_global": 2, "n_local": 8, "global_scale": [0.4, 1.0],
             "local_scale": [0.05, 0.4], "blur": "dino", **IMAGENET},
    "ibot": {"global_size": 224, "local_size": 96, "n_global": 2, "n_local": 10, "global_scale": [0.25, 1.0],
             "local_scale": [0.05, 0.25], "blur": "dino", **IMAGENET},
    "dinov2": {"global_size": 224, "local_size": 96, "n_global": 2, "n_local": 8, "global_scale": [0.32, 1.0],
               "local_scale": [0.05, 0.32], "blur": "dino", **IMAGENET},
    # digits keeps the model's 224 px unless stated; its local crops are half the global size
    "digits": {"global_size": 224, "local_size": 112, "n_global": 2, "n_local": 4, "global_scale": [0.5, 1.0],
               "local_scale": [0.2, 0.5], "blur": "dino", "mean": [0.3, 0.3, 0.3], "std": [0.4, 0.4, 0.4]},
}
TRANSFORM_FIELDS = ("global_size", "local_size", "n_global", "n_local", "global_scale", "local_scale", "mean", "std")


def _resolved_augment(overrides: list[str]) -> dict:
    """data.augment as the run's config.yaml holds it."""
    cfg = load_config(overrides=BASE + overrides, world_size=1)
    return yaml.safe_load(to_yaml(cfg))["data"]["augment"]


def _transform_values(transform: MultiCropTransform | DigitsMultiCrop) -> dict:
    return {name: list(v) if isinstance(v := getattr(transform.cfg, name), tuple) else v for name in TRANSFORM_FIELDS}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_values_are_resolved_into_the_config_and_the_transform(preset: str):
    dumped = _resolved_augment([f"data.augment.preset={preset}"])
    assert dumped == {"preset": preset, **EXPECTED[preset]}
    cfg = load_config(overrides=BASE + [f"data.augment.preset={preset}"], world_size=1)
    transform = multicrop_from_config(cfg.data.augment)  # what the trainer's data stream is built with
    assert type(transform) is (DigitsMultiCrop if preset == "digits" else MultiCropTransform)
    expected = {k: v for k, v in EXPECTED[preset].items() if k in TRANSFORM_FIELDS}
    assert _transform_values(transform) == expected


def test_the_transform_renders_the_preset_views():
    cfg = load_config(overrides=BASE + ["data.augment.preset=ibot", "data.augment.global_size=64",
                                        "model.patch_size=8"], world_size=1)
    transform = multicrop_from_config(cfg.data.augment)
    image = Image.fromarray((np.random.default_rng(0).random((80, 80, 3)) * 255).astype(np.uint8))
    views = transform(image, torch.Generator().manual_seed(0))
    # iBOT: 2 global + 10 local crops; local = 64 * 96 / 224 = 27.4 px, rounded to a multiple of the patch (8)
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 24, 24)] * 10


def test_stated_values_win_over_the_preset():
    dumped = _resolved_augment(["data.augment.preset=ibot", "data.augment.n_local=3",
                                "data.augment.global_scale=[0.5, 1.0]", "data.augment.mean=[0.5, 0.5, 0.5]",
                                "data.augment.local_size=48"])
    assert dumped == {"preset": "ibot", "global_size": 224, "local_size": 48, "n_global": 2, "n_local": 3,
                      "global_scale": [0.5, 1.0], "local_scale": [0.05, 0.25], "blur": "dino",
                      "mean": [0.5, 0.5, 0.5], "std": IMAGENET["std"]}


def test_local_size_follows_the_global_size_in_whole_patches():
    assert _resolved_augment(["data.augment.preset=dino", "data.augment.global_size=96",
                              "model.patch_size=8"])["local_size"] == 40  # 41.1 px -> 5 patches of 8
    assert _resolved_augment(["data.augment.preset=digits", "data.augment.global_size=32",
                              "model.patch_size=4"])["local_size"] == 16


def test_resolved_config_reloads_to_the_same_numbers(tmp_path):
    cfg = load_config(overrides=BASE + ["data.augment.preset=dino"], world_size=1)
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path, world_size=1).data.augment == cfg.data.augment


def test_bad_stated_value_names_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=BASE + ["data.augment.preset=dino", "data.augment.local_scale=[0.5, 0.2]"])
    assert str(info.value) == ("data.augment.local_scale: got [0.5, 0.2], expected [min, max] with "
                               "0 < min <= max <= 1")
