"""Full fine-tuning of a pretrained ViL backbone with timm's parts (MAE / BEiT-style classification fine-tune).

Pieces: ``create_optimizer_v2`` with layer-wise lr decay over the model's ``group_matcher`` (stem, one group per
ViL block pair, head); timm's cosine scheduler stepped on every optimizer update (only timm's schedulers apply
the per-group ``lr_scale`` that layer decay relies on); Mixup / CutMix with ``SoftTargetCrossEntropy``;
RandAugment / RandomErasing through ``create_transform``; drop path; ``ModelEmaV3``; bf16 autocast on GPU.

Exact resume: a checkpoint (atomic, hashed: :class:`ssl_vil.checkpoint.CheckpointManager`) holds the model,
optimizer, EMA and data cursor at an optimizer step. Every other source of randomness is a pure function of
counters: augmentations are seeded per sample, and the global RNGs (Mixup's numpy draws, drop path) are
reseeded from ``(seed, step, rank)`` before each step, as the lr is recomputed from the step. A run killed after
the checkpoint of step ``s`` and resumed therefore produces the same losses from step ``s + 1`` on as a run that
was never interrupted (bitwise, on a deterministic device such as the CPU in fp32).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_vil.data.seeding import stable_seed
from ssl_vil.eval.finetune_config import FinetuneConfig
from ssl_vil.eval.inputs import EvalSource, eval_transform, open_eval_source
from ssl_vil.infra.dist import all_reduce_
from ssl_vil.infra.precision import autocast
from ssl_vil.eval.supervised_run import TRAIN_LOG  # noqa: F401  (the run's step log, named here for callers)

logger = logging.getLogger("ssl_vil.eval")

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
RESULTS_FILE = "results_finetune.json"


# --------------------------------------------------------------------------------------------------- model
def build_model(cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """Classifier with ``num_classes`` outputs and drop path, initialised from ``cfg.model.weights`` (or random).

    Returns (model, info) with info = model.json-style ``{"model", "kwargs", "img_size", "mean", "std", ...}``.
    """
    m = cfg.model
    return create_model_from(m.weights, m.name, m.kwargs, num_classes=num_classes, drop_path_rate=m.drop_path_rate,
                             img_size=cfg.data.img_size)


def create_model_from(weights: str | None, name: str | None, kwargs: Mapping[str, Any], *, num_classes: int,
                      drop_path_rate: float, img_size: int | None, **extra: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model with a fresh ``num_classes`` head (0: none), its backbone from ``weights`` (or random init).

    The pretrained backbone is read by :func:`ssl_vil.export.load_pretrained_backbone` (any weights format) and
    copied into a fresh model built at ``img_size`` with ``kwargs`` over the pretraining architecture's (position embedding resized by
    :func:`ssl_vil.backbones.load_backbone_weights`); only the classifier keeps its fresh initialisation.
    ``extra``: further constructor arguments (e.g. ``dynamic_img_size`` for a ViT). Returns (model, info) with
    info = model.json-style ``{"model", "kwargs", "img_size", "mean", "std", ...}``.
    """
    import timm

    import ssl_vil  # noqa: F401  (registers the ViL models with timm)
    from ssl_vil.backbones import load_backbone_weights

    if weights is not None:
        from ssl_vil.export import load_pretrained_backbone

        backbone, info = load_pretrained_backbone(weights, name, **kwargs)
        # ``kwargs`` also override the pretraining architecture where its weights still fit, e.g. stride: 8 for
        # long-sequence fine-tuning (same patch kernel; the position embedding is interpolated to the new grid).
        model_kwargs = {**info["kwargs"], **kwargs}
        if img_size is not None:
            model_kwargs["img_size"] = img_size
        model = timm.create_model(info["model"], pretrained=False, num_classes=num_classes,
                                  drop_path_rate=drop_path_rate, **model_kwargs, **extra)
        # Strict apart from the classifier side (head, pre-head norm), which keeps its fresh init.
        load_backbone_weights(model, backbone.state_dict())
        del backbone
    else:
        model_kwargs = dict(kwargs)
        if img_size is not None:
            model_kwargs["img_size"] = img_size
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate,
                                  **model_kwargs, **extra)
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        info = {"model": name, "kwargs": dict(kwargs), "source": None,
                "img_size": kwargs.get("img_size", pcfg.get("input_size", (3, 224, 224))[-1]),
                "mean": list(pcfg.get("mean", DEFAULT_MEAN)), "std": list(pcfg.get("std", DEFAULT_STD))}
    return model, info


# ---------------------------------------------------------------------------------------- optim and schedule
def learning_rate(cfg: FinetuneConfig, global_batch_size: int) -> float:
    """Peak lr: ``optim.lr`` if set, else ``base_lr x global_batch / 256`` (linear scaling, as MAE and BEiT)."""
    return cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * global_batch_size / 256.0


def build_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """timm optimizer; with layer decay each param group carries ``lr_scale`` = decay^(groups-1-group index)."""
    from timm.optim import create_optimizer_v2

    o = cfg.optim
    extra: dict[str, Any] = {}
    if any(name in o.opt.lower() for name in ("adam", "lamb", "lion", "adopt", "laprop")):
        extra["betas"] = tuple(o.betas)
    layer_decay = o.layer_decay if o.layer_decay is not None and o.layer_decay < 1.0 else None
    return create_optimizer_v2(model, opt=o.opt, lr=lr, weight_decay=o.weight_decay, layer_decay=layer_decay,
                               **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, steps_per_epoch: int) -> Any:
    """timm cosine schedule with linear warmup, in optimizer updates (``step_update(step)`` before each step)."""
    from timm.scheduler import create_scheduler_v2

    s = cfg.schedule
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=s.train_epochs, warmup_epochs=s.warmup_epochs,
        warmup_lr=s.warmup_lr, min_lr=s.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def reseed_step(seed: int, step: int, rank: int) -> None:
    """Global RNGs (python, numpy, torch) from (seed, step, rank): Mixup and drop path become step functions."""
    s = stable_seed(seed, "finetune-step", step, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


# -------------------------------------------------------------------------------------------------- eval
@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    total: int


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device,
             precision: str = "auto") -> EvalResult:
    """Top-1 / top-5 (%) and mean cross-entropy over all batches (summed over ranks when distributed)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, count
    with autocast(precision, device):
        for batch in batches:
            images = batch["images"].to(device, non_blocking=True)
            labels = torch.as_tensor(batch["labels"], dtype=torch.long).to(device)
            logits = model(images).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == labels.unsqueeze(1)
            sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(),
                                 nn.functional.cross_entropy(logits, labels, reduction="sum"),
                                 torch.tensor(labels.numel(), device=device)]).double()
    all_reduce_(sums)
    model.train(was_training)
    top1, top5, loss, total = sums.tolist()
    n = max(total, 1.0)
    return EvalResult(100.0 * top1 / n, 100.0 * top5 / n, loss / n, int(total))


def open_val_source(cfg: FinetuneConfig, *, train_classes: Sequence[str], img_size: int, mean: Sequence[float],
                    std: Sequence[float], split: str | None, rank: int, world_size: int) -> EvalSource | None:
    """The val data (None without ``data.val``), its labels as indices of ``train_classes`` matched by name.

    Opened once when the run is built, so val classes the train data lacks are refused before training starts.
    """
    d = cfg.data
    if not d.val:
        return None
    return open_eval_source(d.val, transform=eval_transform(img_size, mean, std, d.eval_crop_pct),
                            batch_size=d.batch_size, rank=rank, world_size=world_size, num_workers=d.num_workers,
                            split=split, classes=list(train_classes),
                            classes_source=f"data.train ({d.train}" + (f" [{cfg.data.train_split}]"
                                                                     if cfg.data.train_split else "") + ")")


# ----------------------------------------------------------------------------------------------- duration
def total_steps_of(cfg: FinetuneConfig, steps_per_epoch: int) -> int:
    return cfg.schedule.train_epochs * steps_per_epoch
