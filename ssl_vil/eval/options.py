"""The evaluation commands' options that their parsers need: no torch, so ``--help`` and a bad flag are fast.

The modules doing the work re-export them (``ssl_vil.eval.inputs.EvalInputsConfig``,
``ssl_vil.eval.features.FEATURE_SPECS``, ``ssl_vil.eval.knn_search.BACKENDS``,
``ssl_vil.eval.linear_probe.DEFAULT_LRS``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Literal

from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid

# Pooled features of a frozen backbone: "[CLS]" (bilateral pooled token), "[AVG]" (mean token), or their concat.
FEATURE_SPECS: tuple[str, ...] = ("cls", "avg", "cls+avg")
# Exact k-NN search backends.
BACKENDS: tuple[str, ...] = ("torch", "faiss")
# The DINOv2 linear-probe grid of base learning rates (scaled by global batch / 256).
DEFAULT_LRS: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


# DINO / DINOv2 k-NN and linear eval: resize 256 -> center crop 224, i.e. crop fraction 0.875.
DEFAULT_CROP_PCT = 0.875


@dataclass(kw_only=True, slots=True)
class EvalInputsConfig(Config):
    """What every evaluation CLI reads: the weights, the train/val data, how to load it, where to write."""

    weights: str
    model: str | None
    train_data: str
    val_data: str
    train_split: str | None
    val_split: str | None
    batch_size: int
    num_workers: int
    img_size: int | None
    crop_pct: float | None
    device: Literal["auto", "cpu", "cuda"]
    output_dir: str | None

    def validate(self) -> None:
        if self.batch_size < 1:
            raise invalid("batch_size", self.batch_size, "an int >= 1")
        if self.num_workers < 0:
            raise invalid("num_workers", self.num_workers, "an int >= 0")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise invalid("crop_pct", self.crop_pct, "a fraction in (0, 1]")


def refuse_pipe_urls(cfg: EvalInputsConfig) -> None:
    """``pipe:`` URLs run a shell command per shard; the evaluation commands do not take them."""
    for key in ("train_data", "val_data"):
        value = getattr(cfg, key)
        if str(value).startswith("pipe:"):
            raise invalid(key, value, "a shard dir / glob / http(s) URL or an ImageFolder directory; pipe: URLs "
                          "(shell commands) are not supported by the evaluation commands: fetch the shards first")


def default_num_workers() -> int:
    """Loader workers per process by default: 4, or fewer on a machine (or a Slurm allocation) with fewer cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def add_input_arguments(p: argparse.ArgumentParser, *, weights_help: str, batch_size: int, batch_help: str,
                        results_file: str) -> None:
    """The flags of :class:`EvalInputsConfig`, declared once for every evaluation CLI (same names, defaults and
    help): the weights, the train/val data and splits, batch size, loader workers, image size, crop, device and
    output dir."""
    data_help = "shard dir / glob / URL, or ImageFolder directory"
    p.add_argument("--weights", required=True, help=weights_help)
    p.add_argument("--model", default=None, help="timm model name (only for weights files without model.json)")
    p.add_argument("--train-data", required=True, help=data_help)
    p.add_argument("--val-data", required=True, help=data_help)
    p.add_argument("--train-split", default=None,
                   help="split name when --train-data holds several (default: 'train' if present)")
    p.add_argument("--val-split", default=None,
                   help="split name when --val-data holds several (default: 'val' if present)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--num-workers", type=int, default=default_num_workers(),
                   help="loader workers per process (default: 4, at most the CPU cores)")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's pretraining size")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="center-crop fraction (resize = img_size / crop_pct); "
                        f"default: model info or {DEFAULT_CROP_PCT}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--output-dir", default=None, help=f"writes {results_file} there (rank 0)")
