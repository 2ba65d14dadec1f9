"""Linear-probe grid evaluation (DINOv2 protocol, see :mod:`ssl_vil.eval.linear_probe`); behind ``eval/linear.py``.

    python eval/linear.py --weights RUN --train-data D --val-data D [--train-epochs 10] [--batch-size 128]
        [--lrs ...] [--block-counts 1 4] [--heldout-fraction 0.1] [--precompute-features] [--output-dir OUT]

Training input (default, the DINOv2 protocol): every step reads fresh train images with bicubic
RandomResizedCrop + horizontal flip and runs the frozen backbone. ``--precompute-features`` instead extracts
un-augmented features once and trains on those (much faster on CPU; no augmentation).

Selection: ``heldout_selected`` = the head best on a held-out ``--heldout-fraction`` of the train set (by sample
key, never trained on), reported with its val accuracy; ``val_selected`` = the head best on val itself (DINOv2's
number, optimistic).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_vil.config import engine
from ssl_vil.config.errors import invalid
from ssl_vil.eval.options import DEFAULT_CROP_PCT, DEFAULT_LRS, EvalInputsConfig, add_input_arguments, refuse_pipe_urls
from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors

if TYPE_CHECKING:  # the work's modules (torch, torchvision, timm) load when an evaluation runs, not for --help
    import torch

    from ssl_vil.eval import linear_probe as linear
    from ssl_vil.eval.progress import Progress
    from ssl_vil.infra.dist import DistInfo

logger = logging.getLogger("ssl_vil.eval")

RESULTS_FILE = "results_linear.json"
PROG = "eval/linear.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Linear-probe grid of a pretrained ViL backbone",
                                formatter_class=HelpFormatter)
    add_version(p)
    add_input_arguments(p, weights_help="run dir | checkpoint folder | exported .safetensors | weights file",
                        batch_size=128, batch_help="per process", results_file=RESULTS_FILE)
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS),
                   help="base lrs (scaled by global batch / 256)")
    p.add_argument("--block-counts", type=int, nargs="+", default=[1, 4], help="last-n block pairs per head")
    duration = p.add_mutually_exclusive_group()
    duration.add_argument("--train-epochs", type=float, default=None, help="epochs over the train part (default 10)")
    duration.add_argument("--train-steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--precompute-features", action="store_true",
                   help="train on un-augmented features extracted once (fast on CPU) instead of augmented images")
    p.add_argument("--seed", type=int, default=0)
    return p


def _augment_transform(img_size: int, mean: list[float], std: list[float]) -> Any:
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ])


def _extract_bank(batches: Iterable[dict[str, Any]], fn, device: torch.device, progress: Progress,
                  keep: Any = None) -> linear.FeatureBank:
    """Grid features of every sample (``keep(key)`` filters) on CPU float32."""
    import torch

    from ssl_vil.eval import linear_probe as linear
    from ssl_vil.infra.precision import autocast

    cls_parts, avg_parts, labels, keys = [], [], [], []
    with torch.no_grad(), autocast("auto", device):
        for batch in batches:
            cls, avg = fn(batch["images"].to(device, non_blocking=True))
            mask = [True] * len(batch["keys"]) if keep is None else [keep(k) for k in batch["keys"]]
            idx = torch.tensor([i for i, m in enumerate(mask) if m], dtype=torch.long)
            cls_parts.append(cls.float().cpu()[idx])
            avg_parts.append(avg.float().cpu()[idx])
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.long)[idx])
            keys.extend(k for k, m in zip(batch["keys"], mask) if m)
            progress.update(len(mask))
    progress.close()
    if not cls_parts:
        return linear.FeatureBank(torch.empty(0, 0, 0), torch.empty(0, 0), torch.empty(0, dtype=torch.long), [])
    return linear.FeatureBank(torch.cat(cls_parts), torch.cat(avg_parts), torch.cat(labels), keys)


@dataclass(kw_only=True, slots=True)
class LinearEvalConfig(EvalInputsConfig):
    """The evaluation's settings, typed and checked by the config engine: one field per flag of
    :func:`build_parser` (``--train-data X`` is ``train_data``), whose defaults the flags hold; the
    inputs' fields come from :class:`EvalInputsConfig`."""

    lrs: list[float]
    block_counts: list[int]
    train_epochs: float | None
    train_steps: int | None
    heldout_fraction: float
    precompute_features: bool
    seed: int

    def validate(self) -> None:
        EvalInputsConfig.validate(self)  # explicit: slots=True rebuilds the class, which zero-arg super() misses
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise invalid("lrs", self.lrs, "positive learning rates")
        if not self.block_counts or any(n < 1 for n in self.block_counts):
            raise invalid("block_counts", self.block_counts, "block counts >= 1")
        if self.train_epochs is not None and self.train_epochs <= 0:
            raise invalid("train_epochs", self.train_epochs, "a positive number of epochs")
        if self.train_steps is not None and self.train_steps < 1:
            raise invalid("train_steps", self.train_steps, "an int >= 1")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise invalid("heldout_fraction", self.heldout_fraction, "a fraction in [0, 1)")
        refuse_pipe_urls(self)


def parse_config(argv: list[str] | None = None) -> LinearEvalConfig:
    """The command line as a checked :class:`LinearEvalConfig`."""
    return engine.parse_flags(LinearEvalConfig, build_parser(), argv)


@user_errors(PROG)
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the linear grid; a user error (unreadable weights, data that cannot be evaluated...) exits with status 2
    and one line on stderr (:mod:`ssl_vil.infra.cli_errors`)."""
    args = parse_config(argv)
    from ssl_vil.infra.dist import process_group

    with process_group(args.device) as dist:
        return evaluate(args, dist)


def evaluate(args: LinearEvalConfig, dist: DistInfo) -> dict[str, Any]:
    """The linear-grid evaluation for parsed ``args`` on this process (collective when distributed)."""
    import torch

    from ssl_vil.eval import features as feats
    from ssl_vil.eval import linear_probe as linear
    from ssl_vil.eval.inputs import default_split, eval_transform, open_eval_source
    from ssl_vil.eval.progress import Progress
    from ssl_vil.eval.reporting import setup_logging
    from ssl_vil.eval.train_inputs import open_train_stream
    from ssl_vil.eval.weights_id import weights_sha256
    from ssl_vil.export import load_pretrained_backbone
    from ssl_vil.infra.dist import all_reduce_scalar, barrier
    from ssl_vil.infra.files import write_json_atomic
    from ssl_vil.infra.precision import autocast

    t_start = time.perf_counter()
    setup_logging(dist.rank)
    device = dist.device

    model, info = load_pretrained_backbone(args.weights, args.model)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    depth = len(model.blocks)
    block_counts = sorted({min(n, depth) for n in args.block_counts})
    if block_counts != sorted(set(args.block_counts)):
        logger.warning("model has %d block pairs: block counts %s capped to %s", depth, args.block_counts, block_counts)
    n_blocks = max(block_counts)
    img_size = args.img_size or int(info["img_size"])
    crop_pct = args.crop_pct if args.crop_pct is not None else float(info.get("crop_pct", DEFAULT_CROP_PCT))
    mean, std = list(info["mean"]), list(info["std"])
    cls_pooling = feats.cls_pooling_of(model, info)

    def grid_fn(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return feats.block_features(model, images, n_blocks, cls_pooling)

    train_split = args.train_split or default_split(args.train_data, "train")
    val_split = args.val_split or default_split(args.val_data, "val")
    frac = args.heldout_fraction
    times: dict[str, float] = {}

    def eval_source(data: str, split: str | None, **align: Any):
        return open_eval_source(data, transform=eval_transform(img_size, mean, std, crop_pct),
                                batch_size=args.batch_size, rank=dist.rank, world_size=dist.world_size,
                                num_workers=args.num_workers, split=split, **align)

    # Un-augmented passes: val always; the train set for the held-out part (and, precomputed, for training).
    # The train data's class list is the index of every label; val labels are matched to it by name.
    t0 = time.perf_counter()
    train_src = eval_source(args.train_data, train_split)
    classes = list(train_src.classes)
    val_src = eval_source(args.val_data, val_split, classes=classes,
                          classes_source=f"train data ({train_src.description})")
    val_bank = _extract_bank(val_src.batches(), grid_fn, device, Progress("val features", val_src.num_samples,
                                                                           enabled=dist.is_main))
    keep = None if args.precompute_features else (lambda k: linear.is_heldout(k, frac))
    train_bank = _extract_bank(train_src.batches(), grid_fn, device,
                               Progress("train features" if keep is None else "held-out features",
                                        train_src.num_samples, enabled=dist.is_main), keep=keep)
    times["features_s"] = time.perf_counter() - t0
    fit_bank, heldout_bank = linear.split_heldout(train_bank, frac) if keep is None else (None, train_bank)
    n_heldout = all_reduce_scalar(len(heldout_bank), "sum", device)
    n_train_total = train_src.num_samples or all_reduce_scalar(len(train_bank), "sum", device)
    n_fit = n_train_total - n_heldout
    num_classes = max(len(train_src.classes), int(val_bank.labels.max()) + 1 if len(val_bank) else 0,
                      int(heldout_bank.labels.max()) + 1 if len(heldout_bank) else 0)
    num_classes = all_reduce_scalar(num_classes, "max", device)
    cls_dim = val_bank.cls.shape[2] if len(val_bank) else _probe_dims(grid_fn, img_size, device)[0]
    avg_dim = val_bank.avg.shape[1] if len(val_bank) else _probe_dims(grid_fn, img_size, device)[1]

    specs = linear.make_grid(lrs=args.lrs, block_counts=block_counts)
    torch.manual_seed(args.seed)
    grid = linear.LinearGrid(specs, cls_dim, avg_dim, num_classes).to(device)
    global_batch = args.batch_size * dist.world_size
    steps_per_epoch = max(1, math.ceil(n_fit / global_batch))
    total_steps = args.train_steps or max(1, round((args.train_epochs or 10.0) * steps_per_epoch))
    logger.info("linear grid: %d heads (%d lrs x blocks %s x {cls, cls+avg}), %d classes, %d steps, global batch %d, "
                "%s", len(specs), len(args.lrs), block_counts, num_classes, total_steps, global_batch,
                "precomputed features" if args.precompute_features else "augmented images")

    progress = Progress("linear training", total_steps, unit="step", enabled=dist.is_main)
    t0 = time.perf_counter()
    if args.precompute_features:
        def epoch_batches(epoch: int) -> Iterator[linear.GridFeatures]:
            for f in fit_bank.batches(args.batch_size, shuffle_seed=args.seed * 100_003 + epoch * 7919 + dist.rank):
                yield linear.GridFeatures(f.cls.to(device), f.avg.to(device), f.labels.to(device))
    else:
        stream = open_train_stream(args.train_data, transform=_augment_transform(img_size, mean, std),
                                   batch_size=args.batch_size, seed=args.seed, rank=dist.rank,
                                   world_size=dist.world_size, num_workers=args.num_workers, split=train_split)

        def epoch_batches(epoch: int) -> Iterator[linear.GridFeatures]:
            del epoch  # the stream keeps its own epoch cursor
            for batch in stream:
                idx = torch.tensor([i for i, k in enumerate(batch["keys"]) if not linear.is_heldout(k, frac)],
                                   dtype=torch.long)
                if idx.numel() == 0:
                    yield linear.GridFeatures(torch.empty(0, n_blocks, cls_dim, device=device),
                                              torch.empty(0, avg_dim, device=device),
                                              torch.empty(0, dtype=torch.long, device=device))
                    continue
                with torch.no_grad(), autocast("auto", device):
                    cls, avg = grid_fn(batch["views"][idx].to(device, non_blocking=True))
                yield linear.GridFeatures(cls.float(), avg.float(), batch["labels"][idx].to(device))

    linear.train_grid(grid, epoch_batches, total_steps=total_steps, global_batch_size=global_batch,
                      on_step=lambda step, losses: progress.update(1))
    progress.close()
    times["train_s"] = time.perf_counter() - t0

    def as_device(bank: linear.FeatureBank) -> Iterator[linear.GridFeatures]:
        for f in bank.batches(1024):
            yield linear.GridFeatures(f.cls.to(device), f.avg.to(device), f.labels.to(device))

    heldout_metrics = linear.evaluate(grid, as_device(heldout_bank)) if n_heldout else {}
    val_metrics = linear.evaluate(grid, as_device(val_bank))
    rep = linear.report(specs, heldout_metrics, val_metrics)
    times["total_s"] = time.perf_counter() - t_start
    results: dict[str, Any] = {
        "protocol": "linear_grid",
        "weights": str(args.weights),
        "weights_sha256": weights_sha256(info.get("source", args.weights)),
        "model": info["model"], "model_kwargs": info.get("kwargs", {}),
        "training_input": "precomputed un-augmented features" if args.precompute_features
        else "augmented images (bicubic RandomResizedCrop + flip)",
        "cls_pooling": cls_pooling, "img_size": img_size, "crop_pct": crop_pct,
        "n_train_fit": n_fit, "n_heldout": n_heldout, "heldout_fraction": frac,
        "n_val": all_reduce_scalar(len(val_bank), "sum", device), "num_classes": num_classes,
        "classes": classes, "val_classes": list(val_src.own_classes),
        "global_batch_size": global_batch, "train_steps": total_steps,
        "train_epochs": total_steps / steps_per_epoch, "lrs": list(args.lrs), "block_counts": block_counts,
        "heldout_selected": rep.heldout_selected, "val_selected": rep.val_selected, "heads": rep.heads,
        "world_size": dist.world_size, "elapsed": times,
    }
    hs, vs = rep.heldout_selected, rep.val_selected
    summary = (f"linear grid ({len(specs)} heads, {total_steps} steps): held-out-selected {hs['head']} "
               f"val top1 {hs.get('val_top1', float('nan')):.2f} | val-selected {vs['head']} val top1 "
               f"{vs['val_top1']:.2f}")
    results["summary"] = summary
    if dist.is_main:
        if args.output_dir is not None:
            write_json_atomic(Path(args.output_dir) / RESULTS_FILE, results)
        print(summary, flush=True)
    barrier()
    return results


def _probe_dims(fn, img_size: int, device: torch.device) -> tuple[int, int]:
    """(cls_dim, avg_dim) from one dummy image, for a rank that holds no val sample."""
    import torch

    with torch.no_grad():
        cls, avg = fn(torch.zeros(1, 3, img_size, img_size, device=device))
    return cls.shape[2], avg.shape[1]


if __name__ == "__main__":
    main()
