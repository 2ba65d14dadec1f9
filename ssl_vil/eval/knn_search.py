"""Exact k-nearest-neighbour classification on L2-normalised features (DINO / DINOv2 protocol).

Similarity is the inner product (= cosine for unit vectors). Each query's top ``max(k)`` neighbours vote
for their class with weight ``exp(sim / T)`` (T = 0.07); the top-1 / top-5 accuracy is reported for every
``k`` from the same neighbour list, as DINO's ``eval_knn.py`` and DINOv2's ``eval/knn.py`` do.

Two search backends give the same neighbours (up to exact similarity ties):
  * ``torch``: query chunks x the whole train matrix, matmul into a reused buffer, then an exact grouped
    top-k (see :func:`_grouped_topk`); runs on CPU or GPU.
  * ``faiss``: ``IndexFlatIP`` (faiss-cpu), or ``GpuIndexFlatIP`` when CUDA and a GPU faiss build exist.

Distributed search follows DINOv2: every rank holds only its own shard of the train features; for each
source rank in turn its queries are broadcast, every rank searches its shard, and the partial top-k lists
are gathered to the source rank and merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as torch_dist

from ssl_vil.eval.options import BACKENDS  # noqa: F401  (defined torch-free for the CLI parser)
from ssl_vil.infra.dist import all_reduce_, all_reduce_scalar, broadcast_, rank, world_size

Backend = Literal["torch", "faiss"]

# Bytes of similarity scores materialised per query chunk; 512 MiB keeps the chunk in the thousands of
# queries for 100k train images and bounded for ImageNet-size banks (1.28M x 4 B x 100 queries).
DEFAULT_CHUNK_BYTES = 512 << 20
# Group size of the grouped top-k: larger groups shrink the first top-k but enlarge the candidate set.
_TOPK_GROUP = 32


@dataclass(frozen=True)
class Neighbours:
    """Top-k neighbours of a set of queries, sorted by decreasing similarity.

    sims: (Q, k) float32 similarities; labels: (Q, k) int64 train labels of those neighbours.
    Slots that no train sample fills (only when k exceeds the train set) hold sim = -inf, label = -1.
    """

    sims: torch.Tensor
    labels: torch.Tensor


def _grouped_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of ``scores`` (C, N): returns (values, column indices), both (C, k).

    ``torch.topk`` over 100k columns costs about as much as the matmul on CPU. Instead split the columns
    into strided groups, take each group's max (one vectorised pass), keep the k groups with the largest
    maxima and run top-k only over their members. This is exact: a top-k element outside the k best groups
    would be beaten by k group maxima, i.e. it would rank k+1 or lower (ties aside).
    """
    rows, n = scores.shape
    group = _TOPK_GROUP
    groups_n = n // group
    if k >= groups_n or scores.device.type != "cpu":
        # GPU top-k is already fast; tiny banks gain nothing from grouping.
        return scores.topk(k, dim=1)
    main = scores[:, : groups_n * group].view(rows, group, groups_n)
    _, best_groups = main.amax(dim=1).topk(k, dim=1)  # (C, k) group ids
    offsets = torch.arange(group, device=scores.device).view(1, group, 1) * groups_n
    cols = (best_groups.unsqueeze(1) + offsets).reshape(rows, group * k)
    if groups_n * group < n:  # the ragged tail is always a candidate
        tail = torch.arange(groups_n * group, n, device=scores.device).expand(rows, -1)
        cols = torch.cat([cols, tail], dim=1)
    values, pick = scores.gather(1, cols).topk(k, dim=1)
    return values, cols.gather(1, pick)


def search_torch(
    queries: torch.Tensor, bank: torch.Tensor, k: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of ``queries`` (Q, D) against ``bank`` (N, D), chunked over queries.

    Returns (sims, indices), each (Q, k) with k <= N, sorted by decreasing similarity. The (chunk, N) score
    buffer is allocated once and reused: a fresh 400 MB tensor per chunk costs page faults comparable to
    the matmul itself on CPU.
    """
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"expected queries (Q, D) and bank (N, D), got {tuple(queries.shape)} and {tuple(bank.shape)}")
    n = bank.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}] (train bank size), got {k}")
    q_total = queries.shape[0]
    if q_total == 0:
        return queries.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=queries.device)
    chunk = max(1, min(q_total, chunk_bytes // (n * bank.element_size())))
    buf = torch.empty(chunk, n, dtype=torch.promote_types(queries.dtype, bank.dtype), device=queries.device)
    bank_t = bank.t()
    sims, idx = [], []
    for start in range(0, q_total, chunk):
        q = queries[start : start + chunk]
        scores = buf[: q.shape[0]]
        torch.mm(q, bank_t, out=scores)
        s, i = _grouped_topk(scores, k)
        sims.append(s.float())
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def faiss_gpu_available() -> bool:
    """True when a GPU build of faiss is importable and CUDA is present."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available()


def search_faiss(
    queries: torch.Tensor, bank: torch.Tensor, k: int, *, use_gpu: bool | None = None, fp16: bool = False,
    device: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k with faiss (``IndexFlatIP``; ``GpuIndexFlatIP`` on GPU).

    ``use_gpu=None`` picks the GPU when :func:`faiss_gpu_available`; ``fp16`` stores the GPU index in half
    precision (halves its memory, similarities then carry fp16 rounding). Same contract as :func:`search_torch`;
    results come back on ``queries.device``.
    """
    try:
        import faiss
    except ImportError as exc:
        raise RuntimeError(
            "the faiss k-NN backend needs faiss: pip install 'ssl_vil[faiss-cpu]' (or [faiss-gpu]; never both)"
        ) from exc
    n, d = bank.shape
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}] (train bank size), got {k}")
    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    if use_gpu:
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = device
        cfg.useFloat16 = fp16
        index = faiss.GpuIndexFlatIP(res, d, cfg)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(bank.detach().float().cpu().contiguous().numpy())
    sims, idx = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
    return torch.from_numpy(sims).to(queries.device), torch.from_numpy(idx).long().to(queries.device)


def search(
    queries: torch.Tensor, bank: torch.Tensor, k: int, *, backend: Backend = "torch", faiss_fp16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to :func:`search_torch` or :func:`search_faiss`; returns (sims, indices), each (Q, k)."""
    if backend == "torch":
        return search_torch(queries, bank, k)
    if backend == "faiss":
        gpu = (queries.device.index or 0) if queries.device.type == "cuda" else 0
        return search_faiss(queries, bank, k, fp16=faiss_fp16, device=gpu)
    raise ValueError(f"unknown k-NN backend {backend!r}; expected one of {BACKENDS}")


def _local_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int, backend: Backend, faiss_fp16: bool
) -> Neighbours:
    """Top-k of ``queries`` in this process's bank, padded with (-inf, -1) to exactly k columns."""
    q = queries.shape[0]
    k_local = min(k, bank.shape[0])
    sims = torch.full((q, k), float("-inf"), device=queries.device)
    labels = torch.full((q, k), -1, dtype=torch.long, device=queries.device)
    if k_local > 0 and q > 0:
        s, i = search(queries, bank, k_local, backend=backend, faiss_fp16=faiss_fp16)
        sims[:, :k_local] = s
        labels[:, :k_local] = bank_labels.to(i.device)[i]
    return Neighbours(sims, labels)


def find_neighbours(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    k: int,
    *,
    backend: Backend = "torch",
    faiss_fp16: bool = False,
) -> Neighbours:
    """Top-k train neighbours of each query; distributed when a process group is initialised.

    queries: (Q_rank, D) this rank's queries; bank: (N_rank, D) this rank's shard of the train features;
    bank_labels: (N_rank,). ``k`` must not exceed the global train size. Every rank must call this
    (collective). Returns this rank's queries' neighbours over the *whole* train set.
    """
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} rows but bank_labels has {bank_labels.shape[0]}")
    world, me = world_size(), rank()
    if world == 1:
        return _local_neighbours(queries, bank, bank_labels, k, backend, faiss_fp16)

    device = queries.device
    counts = torch.tensor([queries.shape[0]], dtype=torch.long, device=device)
    all_counts = [torch.zeros_like(counts) for _ in range(world)]
    torch_dist.all_gather(all_counts, counts)
    dim = queries.shape[1]
    mine: Neighbours | None = None
    for src in range(world):
        n_src = int(all_counts[src].item())
        if n_src == 0:
            continue
        q = queries.contiguous() if me == src else torch.empty(n_src, dim, dtype=queries.dtype, device=device)
        broadcast_(q, src=src)
        part = _local_neighbours(q, bank, bank_labels, k, backend, faiss_fp16)
        if me == src:
            sims_parts = [torch.empty_like(part.sims) for _ in range(world)]
            label_parts = [torch.empty_like(part.labels) for _ in range(world)]
            torch_dist.gather(part.sims, sims_parts, dst=src)
            torch_dist.gather(part.labels, label_parts, dst=src)
            # Merge the world * k candidates into the global top-k.
            all_sims, all_labels = torch.cat(sims_parts, dim=1), torch.cat(label_parts, dim=1)
            sims, pick = all_sims.topk(k, dim=1)
            mine = Neighbours(sims, all_labels.gather(1, pick))
        else:
            torch_dist.gather(part.sims, None, dst=src)
            torch_dist.gather(part.labels, None, dst=src)
    if mine is None:  # this rank has no queries
        mine = Neighbours(torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.long, device=device))
    return mine


def class_scores(neighbours: Neighbours, k: int, num_classes: int, temperature: float) -> torch.Tensor:
    """Weighted votes (Q, num_classes) from the first ``k`` neighbours: sum of exp(sim / T) per class.

    Computed in float64 as exp((sim - sim_max) / T): a per-query factor that leaves every ranking unchanged
    but cannot overflow for small T. Empty slots (label -1) cast no vote.
    """
    sims = neighbours.sims[:, :k].double()
    labels = neighbours.labels[:, :k]
    valid = labels >= 0
    # Slot 0 is the best neighbour, which always exists (k <= global train size).
    weights = torch.where(valid, torch.exp((sims - sims[:, :1]) / temperature), torch.zeros_like(sims))
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64, device=sims.device)
    return scores.scatter_add_(1, labels.clamp_min(0), weights)


def rank_of_true_class(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank (Q,) of each target in its score row; ties are broken towards the lower class index."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return (order == targets.unsqueeze(1)).float().argmax(dim=1)


@dataclass(frozen=True)
class KnnCounts:
    """Correct-prediction counts for one k (summed over ranks when distributed)."""

    k: int
    k_effective: int
    top1_correct: int
    top5_correct: int
    total: int

    @property
    def top1(self) -> float:
        return 100.0 * self.top1_correct / max(self.total, 1)

    @property
    def top5(self) -> float:
        return 100.0 * self.top5_correct / max(self.total, 1)


def knn_classify(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    ks: list[int] | tuple[int, ...],
    *,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: Backend = "torch",
    faiss_fp16: bool = False,
) -> list[KnnCounts]:
    """k-NN top-1 / top-5 counts for every k in ``ks`` from one neighbour search (collective when distributed).

    queries (Q_rank, D), query_labels (Q_rank,), bank (N_rank, D), bank_labels (N_rank,): this rank's parts.
    Features are used as given (normalise them first). Each k is capped at the global train size; top-5 is
    "true class among the 5 best-scored classes", so it is 100 % with at most 5 classes.
    """
    if not ks:
        raise ValueError("ks must name at least one k")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, lab in (("query_labels", query_labels), ("bank_labels", bank_labels)):
        if lab.numel() and int(lab.min()) < 0:
            raise ValueError(f"{name} contains negative label {int(lab.min())}; k-NN needs class indices >= 0")
    device = queries.device
    local_max_label = max(
        int(bank_labels.max()) if bank_labels.numel() else -1, int(query_labels.max()) if query_labels.numel() else -1
    )
    n_train = all_reduce_scalar(bank.shape[0], "sum", device)
    max_label = all_reduce_scalar(local_max_label, "max", device)
    if n_train == 0:
        raise ValueError("the train set is empty: no features to search")
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise ValueError(f"label {max_label} found but num_classes={num_classes}")
    k_max = min(max(ks), n_train)
    neighbours = find_neighbours(queries, bank, bank_labels, k_max, backend=backend, faiss_fp16=faiss_fp16)
    targets = query_labels.to(neighbours.labels.device)
    results = []
    for k in ks:
        k_eff = min(k, n_train)
        true_rank = rank_of_true_class(class_scores(neighbours, k_eff, num_classes, temperature), targets)
        counts = torch.tensor([(true_rank == 0).sum(), (true_rank < 5).sum(), true_rank.numel()], dtype=torch.long,
                              device=device)
        top1, top5, total = (int(v) for v in all_reduce_(counts, "sum").tolist())
        results.append(KnnCounts(k=k, k_effective=k_eff, top1_correct=top1, top5_correct=top5, total=total))
    return results
