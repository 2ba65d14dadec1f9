"""Config sections of the trainer's own components: ``guards:`` (:mod:`ssl_vil.train.guards`; fine-tuning uses its
step-guard part) and
``knn_monitor:`` (:mod:`ssl_vil.train.knn_monitor`).

They live here, not in those modules, because the run config composes them and the k-NN monitor imports the run
config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid
from ssl_vil.eval.options import DEFAULT_CROP_PCT


@dataclass(kw_only=True, slots=True)
class StepGuardConfig(Config):
    """What the step guard does with a step's losses and gradient norm: non-finite values skip the step or halt
    the run; a loss / grad-norm spike (z-score over the last accepted steps) skips it. Pretraining and
    fine-tuning share it."""

    nonfinite_policy: Literal["skip", "halt"] = "skip"
    max_consecutive_skips: int = 3
    spike_detection: bool = True
    spike_window_steps: int = 50
    spike_z_threshold: float = 6.0

    def validate(self) -> None:
        if self.max_consecutive_skips < 0:
            raise invalid("max_consecutive_skips", self.max_consecutive_skips, "a non-negative integer")
        if self.spike_window_steps < 2:
            raise invalid("spike_window_steps", self.spike_window_steps, "at least 2 steps")
        if self.spike_z_threshold <= 0:
            raise invalid("spike_z_threshold", self.spike_z_threshold, "a positive z-score")


@dataclass(kw_only=True, slots=True)
class GuardConfig(StepGuardConfig):
    """Pretraining's guards: the step guard's, plus teacher collapse (entropy / ln K above ``collapse_ratio`` for
    ``collapse_window_steps``) and the hang watchdog."""

    collapse_ratio: float = 0.95  # teacher entropy / ln K
    collapse_window_steps: int = 200
    watchdog_timeout_s: float = 1800.0

    def validate(self) -> None:
        StepGuardConfig.validate(self)  # explicit: zero-argument super() fails in slotted dataclasses
        if self.collapse_window_steps <= 0:
            raise invalid("collapse_window_steps", self.collapse_window_steps, "a positive number of steps")
        if not 0.0 < self.collapse_ratio <= 1.0:
            raise invalid("collapse_ratio", self.collapse_ratio, "a ratio in (0, 1]")
        if self.watchdog_timeout_s <= 0:
            raise invalid("watchdog_timeout_s", self.watchdog_timeout_s, "a positive number of seconds")


@dataclass(kw_only=True, slots=True)
class KnnMonitorConfig(Config):
    """Periodic k-NN of the teacher backbone during pretraining, every ``every_steps`` (0: off) and at the end,
    on the labelled shards ``train`` (memory bank) and ``val`` (queries); ``k``: neighbour counts reported.

    The protocol is ``eval/knn.py``'s with its defaults: "[CLS]" features, weight exp(sim / ``temperature``),
    bicubic resize of the short side to global_size / ``crop_pct`` and a centre crop of global_size, so the
    monitor's numbers are the ones the k-NN CLI gives for the same checkpoint and data.
    """

    every_steps: int = 0
    train: str = ""
    val: str = ""
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    crop_pct: float = DEFAULT_CROP_PCT
    batch_size: int = 256

    def validate(self) -> None:
        if self.every_steps < 0:
            raise invalid("every_steps", self.every_steps, "0 (off) or a positive number of steps")
        if not self.k or any(k <= 0 for k in self.k):
            raise invalid("k", self.k, "a non-empty list of positive integers")
        if self.temperature <= 0:
            raise invalid("temperature", self.temperature, "a positive temperature")
        if not 0.0 < self.crop_pct <= 1.0:
            raise invalid("crop_pct", self.crop_pct, "a fraction in (0, 1]")
        if self.batch_size <= 0:
            raise invalid("batch_size", self.batch_size, "a positive integer")
        if self.every_steps and not (self.train and self.val):
            missing = "train" if not self.train else "val"
            raise invalid(missing, getattr(self, missing), "shard paths in knn_monitor.train and knn_monitor.val "
                          "when knn_monitor.every_steps > 0")
