"""What a run says about itself at the start (what will run, on what) and at the end (what came out, what next).

Both are plain text blocks that rank 0 logs; they read the resolved config and the built components, nothing else.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from torch import nn

from ssl_vil import __version__
from ssl_vil.config import RunConfig
from ssl_vil.infra.dist import DistInfo
from ssl_vil.infra.timing import format_duration


def _count(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"


def start_banner(cfg: RunConfig, run_dir: Path, dist: DistInfo, *, student: nn.Module, stream: Any,
                 precision: str, resumed_step: int | None) -> str:
    """The run at a glance: model and size, data and epochs, schedule, device, precision, where it writes.
    ``student``: the network with ``.backbone`` and its heads."""
    m, d, a = cfg.model, cfg.data, cfg.data.augment
    backbone = student.backbone
    n_heads = sum(p.numel() for p in student.parameters()) - sum(p.numel() for p in backbone.parameters())
    arch = getattr(backbone, "dim", None), getattr(backbone, "depth", None)
    steps_per_epoch = stream.batches_per_epoch
    total = cfg.derived.total_steps
    start = "new run" if resumed_step is None else f"resuming at step {resumed_step}"
    terms = ", ".join(f"{name} {w:g}" for name, w in (("dino", cfg.objective.dino_weight),
                                                      ("ibot", cfg.objective.ibot_weight),
                                                      ("koleo", cfg.objective.koleo_weight)) if w)
    classes = f", {len(stream.classes)} classes" if stream.classes else ""
    return "\n".join([
        f"ssl_vil {__version__}: {start} in {run_dir}",
        f"  model     {m.name} (dim {arch[0]}, depth {arch[1]}, patch {m.patch_size}): backbone {_count(backbone)} "
        f"parameters, heads {n_heads / 1e6:.2f}M",
        f"  objective {terms}; crops {a.n_global} x {a.global_size}px + {a.n_local} x {a.local_size}px "
        f"(preset {a.preset})",
        f"  data      {d.train}: {stream.samples_per_epoch:,} samples per epoch{classes}, {steps_per_epoch} steps "
        f"per epoch",
        f"  schedule  {total} steps (~{total / max(1, steps_per_epoch):.1f} epochs) of "
        f"{cfg.optim.global_batch_size} images, peak lr {cfg.derived.peak_lr:g}",
        f"  device    {dist.device.type} x {dist.world_size} process(es), {precision}, "
        f"{d.num_workers} loader worker(s) per process",
    ])


def end_summary(run_dir: Path, *, steps: int, seconds: float, last_loss: float | None,
                knn: dict[str, Any] | None, export_path: Path, knn_data: tuple[str, str] | None) -> str:
    """Final numbers, the exported weights, and the commands that use them."""
    lines = [f"done: {steps} steps in {format_duration(seconds)}"
             + (f"; last loss {last_loss:.4f}" if last_loss is not None else "")]
    if knn:
        k = 20 if "knn_top1_k20" in knn else (knn.get("knn_k") or ["?"])[0]
        top1 = knn.get(f"knn_top1_k{k}", knn.get("knn_top1"))
        if top1 is not None:
            lines.append(f"  k-NN      teacher top-1 {top1:.2f} % at k={k} (last evaluation)")
    export = shlex.quote(str(export_path))
    train, val = knn_data if knn_data else ("TRAIN_DATA", "VAL_DATA")
    lines += [f"  export    {export_path}",
              f"  next      python -m ssl_vil.eval.knn --weights {export} --train-data {shlex.quote(train)} "
              f"--val-data {shlex.quote(val)}",
              f"            python -m ssl_vil.eval.linear --weights {export} --train-data {shlex.quote(train)} "
              f"--val-data {shlex.quote(val)}",
              f"            python -m ssl_vil.report {shlex.quote(str(run_dir))}"]
    return "\n".join(lines)
