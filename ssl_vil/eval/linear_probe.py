"""DINOv2-style linear-probe grid: many linear heads trained in one pass on shared frozen features.

Grid = learning rates x {last 1, last n block pairs} x {[CLS], [CLS] || [AVG]}:
  * [CLS] of a block pair = bilateral pooling of that pair's output after the final norm, (B, 2d);
  * input of a head = concat of the [CLS] of the last n pairs (n * 2d) [+ the [AVG] of the last pair, d].
Every head sees the same batches; each has its own SGD (momentum 0.9, no weight decay) learning rate
``lr * batch / 256`` following one cosine schedule to 0, as in DINOv2's ``eval/linear.py``.

Selection: DINOv2 reports the head that is best *on the val split it reports*. We report that figure for
comparability and, as the honest number, the val accuracy of the head picked on a held-out part of train.
:func:`select_head` only ever receives the held-out metrics for the latter.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ssl_vil.eval.options import DEFAULT_LRS  # noqa: F401  (DINOv2's 13 base lrs; torch-free for the CLI parser)
from ssl_vil.infra.dist import all_reduce_, world_size


@dataclass(frozen=True)
class HeadSpec:
    """One linear head of the grid: its base lr, how many last block pairs it reads, and whether it adds [AVG]."""

    lr: float
    n_last_blocks: int
    use_avg: bool

    @property
    def name(self) -> str:
        return f"blocks{self.n_last_blocks}_{'cls+avg' if self.use_avg else 'cls'}_lr{self.lr:g}"

    def input_dim(self, cls_dim: int, avg_dim: int) -> int:
        return self.n_last_blocks * cls_dim + (avg_dim if self.use_avg else 0)


def make_grid(
    lrs: Sequence[float] = DEFAULT_LRS,
    block_counts: Sequence[int] = (1, 4),
    avg_options: Sequence[bool] = (False, True),
) -> list[HeadSpec]:
    """The cross product of the options, in a fixed order (used for tie-breaking in :func:`select_head`)."""
    if not lrs or not block_counts or not avg_options:
        raise ValueError("the linear grid needs at least one lr, one block count and one avg option")
    if any(lr <= 0 for lr in lrs):
        raise ValueError(f"learning rates must be > 0, got {list(lrs)}")
    return [HeadSpec(lr, n, avg) for n in block_counts for avg in avg_options for lr in lrs]


@dataclass
class GridFeatures:
    """Frozen features of one batch for the whole grid.

    cls: (B, L, Dc) [CLS] of the last L block pairs, oldest first (cls[:, -1] is the last pair);
    avg: (B, Da) [AVG] of the last pair's tokens; labels: (B,) int64.
    """

    cls: torch.Tensor
    avg: torch.Tensor
    labels: torch.Tensor


def head_input(features: GridFeatures, spec: HeadSpec) -> torch.Tensor:
    """(B, spec.input_dim) input of one head: concat of the last n [CLS] (+ [AVG])."""
    n_available = features.cls.shape[1]
    if spec.n_last_blocks > n_available:
        raise ValueError(f"head {spec.name} needs {spec.n_last_blocks} block outputs, features hold {n_available}")
    parts = [features.cls[:, -spec.n_last_blocks :].flatten(1)]
    if spec.use_avg:
        parts.append(features.avg)
    return torch.cat(parts, dim=1)


class LinearGrid(nn.Module):
    """All heads of the grid; ``forward`` returns logits (H, B, C) in ``specs`` order."""

    def __init__(self, specs: Sequence[HeadSpec], cls_dim: int, avg_dim: int, num_classes: int) -> None:
        super().__init__()
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate heads in the grid: {names}")
        self.specs = list(specs)
        self.heads = nn.ModuleList(nn.Linear(s.input_dim(cls_dim, avg_dim), num_classes) for s in specs)
        for head in self.heads:  # DINOv2 init
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features: GridFeatures) -> torch.Tensor:
        # Inputs are shared by the heads of one (n_last_blocks, use_avg) configuration: build each once.
        cache: dict[tuple[int, bool], torch.Tensor] = {}
        out = []
        for spec, head in zip(self.specs, self.heads):
            key = (spec.n_last_blocks, spec.use_avg)
            if key not in cache:
                cache[key] = head_input(features, spec)
            out.append(head(cache[key]))
        return torch.stack(out)


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """Cosine decay from ``base_lr`` at step 0 to 0 at ``total_steps`` (DINOv2 linear: no warmup)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(step, total_steps) / total_steps
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def build_optimizer(grid: LinearGrid, global_batch_size: int) -> torch.optim.SGD:
    """SGD (momentum 0.9, wd 0) with one param group per head at lr = spec.lr * global_batch / 256."""
    groups = [
        {"params": list(head.parameters()), "base_lr": spec.lr * global_batch_size / 256.0, "name": spec.name}
        for spec, head in zip(grid.specs, grid.heads)
    ]
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, weight_decay=0.0)


def set_lrs(optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(step, total_steps, group["base_lr"])


def train_step(grid: LinearGrid, optimizer: torch.optim.Optimizer, features: GridFeatures) -> torch.Tensor:
    """One SGD step of every head on the same batch; returns the per-head losses (H,).

    The summed loss gives each head exactly its own cross-entropy gradient (heads share no parameters).
    Gradients are averaged over ranks when distributed (the grid is replicated, like DDP).
    """
    optimizer.zero_grad(set_to_none=False)
    if features.labels.numel() == 0:
        # A rank whose batch held only held-out samples still joins the gradient all-reduce, with zeros.
        for p in grid.parameters():
            p.grad = torch.zeros_like(p)
        losses = torch.full((len(grid.specs),), float("nan"))
    else:
        logits = grid(features)  # (H, B, C)
        labels = features.labels.expand(logits.shape[0], -1)
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        losses = losses.view(logits.shape[0], -1).mean(dim=1)
        losses.sum().backward()
    if world_size() > 1:
        grads = [p.grad for p in grid.parameters()]
        flat = all_reduce_(torch.cat([g.flatten() for g in grads]), "mean")
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    optimizer.step()
    return losses.detach()


@dataclass
class HeadMetrics:
    """Accuracy of one head on one split (top-1 / top-5 in %)."""

    top1: float
    top5: float
    total: int


@torch.no_grad()
def evaluate(grid: LinearGrid, batches: Iterable[GridFeatures]) -> dict[str, HeadMetrics]:
    """Top-1 / top-5 of every head over all batches (summed over ranks when distributed)."""
    grid.eval()
    n_heads = len(grid.specs)
    device = next(grid.parameters()).device
    counts = torch.zeros(n_heads, 3, dtype=torch.long, device=device)  # top1, top5, total
    for features in batches:
        logits = grid(features)  # (H, B, C)
        labels = features.labels.to(device)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # (H, B, k)
        hit = top == labels.view(1, -1, 1)
        counts[:, 0] += hit[..., 0].sum(dim=1)
        counts[:, 1] += hit.any(dim=-1).sum(dim=1)
        counts[:, 2] += labels.numel()
    all_reduce_(counts)
    grid.train()
    out = {}
    for spec, (c1, c5, total) in zip(grid.specs, counts.tolist()):
        out[spec.name] = HeadMetrics(top1=100.0 * c1 / max(total, 1), top5=100.0 * c5 / max(total, 1), total=total)
    return out


def select_head(metrics: dict[str, HeadMetrics], order: Sequence[str]) -> str:
    """Name of the head with the best top-1 in ``metrics``; ties go to the earliest name in ``order``."""
    if not metrics:
        raise ValueError("no head metrics to select from")
    return max(order, key=lambda name: (metrics[name].top1, -order.index(name)))


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic train / held-out split by sample key (CRC32), identical on every rank and every run."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    return (zlib.crc32(key.encode("utf-8")) % 10_000) < fraction * 10_000


@dataclass
class GridReport:
    """Everything the linear eval reports: per-head metrics and both selections."""

    heads: list[dict]
    heldout_selected: dict
    val_selected: dict


def report(
    specs: Sequence[HeadSpec], heldout: dict[str, HeadMetrics], val: dict[str, HeadMetrics]
) -> GridReport:
    """Per-head table plus the held-out-selected and the val-selected head with their val accuracy.

    The held-out pick sees only ``heldout``; its reported number is the picked head's val accuracy.
    """
    order = [s.name for s in specs]
    rows = []
    for spec in specs:
        rows.append({
            "name": spec.name, "lr": spec.lr, "n_last_blocks": spec.n_last_blocks, "use_avg": spec.use_avg,
            "heldout_top1": heldout[spec.name].top1 if spec.name in heldout else None,
            "val_top1": val[spec.name].top1, "val_top5": val[spec.name].top5,
        })
    picked_heldout = select_head(heldout, order) if heldout else None
    picked_val = select_head(val, order)
    heldout_sel = (
        {"head": picked_heldout, "heldout_top1": heldout[picked_heldout].top1,
         "val_top1": val[picked_heldout].top1, "val_top5": val[picked_heldout].top5}
        if picked_heldout else {"head": None, "note": "no held-out split (heldout fraction 0)"}
    )
    val_sel = {"head": picked_val, "val_top1": val[picked_val].top1, "val_top5": val[picked_val].top5,
               "note": "selected on the reported split (DINOv2 protocol; optimistic)"}
    return GridReport(heads=rows, heldout_selected=heldout_sel, val_selected=val_sel)


@dataclass
class FeatureBank:
    """Precomputed (un-augmented) grid features of a whole split held in memory.

    cls: (N, L, Dc); avg: (N, Da); labels: (N,); keys: N sample keys.
    """

    cls: torch.Tensor
    avg: torch.Tensor
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, mask: torch.Tensor) -> FeatureBank:
        idx = torch.nonzero(mask).flatten()
        return FeatureBank(self.cls[idx], self.avg[idx], self.labels[idx], [self.keys[i] for i in idx.tolist()])

    def batches(self, batch_size: int, *, shuffle_seed: int | None = None) -> Iterable[GridFeatures]:
        """Batches in key-independent index order, or a permutation drawn from ``shuffle_seed``."""
        n = len(self)
        if shuffle_seed is None:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield GridFeatures(self.cls[idx], self.avg[idx], self.labels[idx])


def split_heldout(bank: FeatureBank, fraction: float) -> tuple[FeatureBank, FeatureBank]:
    """(train part, held-out part) of ``bank`` by :func:`is_heldout` on the sample keys."""
    mask = torch.tensor([is_heldout(k, fraction) for k in bank.keys], dtype=torch.bool)
    return bank.subset(~mask), bank.subset(mask)


def train_grid(
    grid: LinearGrid,
    epoch_batches: Callable[[int], Iterable[GridFeatures]],
    *,
    total_steps: int,
    global_batch_size: int,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.optim.Optimizer:
    """Train every head for ``total_steps`` SGD steps over ``epoch_batches(epoch)``, epoch after epoch.

    ``on_step(step, per_head_losses)`` is called after each step (logging). Returns the optimizer.
    """
    optimizer = build_optimizer(grid, global_batch_size)
    grid.train()
    step, epoch = 0, 0
    while step < total_steps:
        produced = False
        for features in epoch_batches(epoch):
            produced = True
            set_lrs(optimizer, step, total_steps)
            losses = train_step(grid, optimizer, features)
            step += 1
            if on_step is not None:
                on_step(step, losses)
            if step >= total_steps:
                break
        if not produced:
            raise ValueError(f"epoch {epoch} of the linear-probe training data yielded no batch")
        epoch += 1
    return optimizer
