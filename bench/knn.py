"""k-NN search speed: torch backend vs faiss-cpu, measured side by side in one run.

    python bench/knn.py [--queries 10000] [--train 100000] [--dim 384] [--k 20] [--repeats 3]

Clustered Gaussian features, L2-normalised, float32, exact inner-product top-k on CPU. Prints best-of
wall times, the torch / faiss ratio (target <= 1.1) and checks that both backends return the same
neighbours: identical index sets per query, except where the k-th and (k+1)-th similarity are
equal to fp32 rounding (then either neighbour is a correct answer) -- those are counted and printed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from ssl_vil.eval.knn_search import search_faiss, search_torch


def make_features(n: int, dim: int, centers: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n, dim) unit vectors around random cluster centres (kNN-like structure, not uniform noise)."""
    assign = torch.randint(0, centers.shape[0], (n,), generator=gen)
    return F.normalize(centers[assign] + 0.5 * torch.randn(n, dim, generator=gen), dim=1)


def compare_neighbours(
    t_sims: torch.Tensor, t_idx: torch.Tensor, f_sims: torch.Tensor, f_idx: torch.Tensor, bank: torch.Tensor,
    queries: torch.Tensor,
) -> tuple[int, int]:
    """Returns (rows with identical neighbour sets, rows that differ only by a similarity tie at rank k).

    Raises AssertionError for any row whose difference is not explained by a tie.
    """
    same = (t_idx.sort(dim=1).values == f_idx.sort(dim=1).values).all(dim=1)
    tie_rows = 0
    for row in torch.nonzero(~same).flatten().tolist():
        only_t = set(t_idx[row].tolist()) - set(f_idx[row].tolist())
        only_f = set(f_idx[row].tolist()) - set(t_idx[row].tolist())
        # Every member that only one side returned must score (to fp32 rounding) the k-th similarity.
        kth = float(t_sims[row, -1])
        extra = [float(queries[row] @ bank[i]) for i in only_t | only_f]
        assert all(abs(sim - kth) <= 1e-6 for sim in extra), (
            f"query {row}: torch and faiss neighbours differ beyond a tie: {sorted(only_t)} vs {sorted(only_f)}"
        )
        tie_rows += 1
    assert torch.allclose(t_sims, f_sims, rtol=0, atol=1e-5), "similarity values differ"
    return int(same.sum()), tie_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(1000, args.dim, generator=gen)
    bank = make_features(args.train, args.dim, centers, gen)
    queries = make_features(args.queries, args.dim, centers, gen)
    print(f"{args.queries} queries x {args.train} train x {args.dim} dims, k={args.k}, float32, "
          f"{args.threads} threads (torch {torch.__version__}, faiss {faiss.__version__})", flush=True)

    times: dict[str, list[float]] = {"torch": [], "faiss": []}
    out = {}
    for rep in range(args.repeats):  # interleaved, so machine load drifts hit both backends alike
        for name, fn in (("faiss", lambda: search_faiss(queries, bank, args.k, use_gpu=False)),
                         ("torch", lambda: search_torch(queries, bank, args.k))):
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"  repeat {rep}: {name:5s} {times[name][-1]:.2f} s", flush=True)

    identical, ties = compare_neighbours(*out["torch"], *out["faiss"], bank, queries)
    best_t, best_f = min(times["torch"]), min(times["faiss"])
    med_t, med_f = sorted(times["torch"])[len(times["torch"]) // 2], sorted(times["faiss"])[len(times["faiss"]) // 2]
    print(f"torch best {best_t:.2f} s (median {med_t:.2f} s); faiss best {best_f:.2f} s (median {med_f:.2f} s)")
    print(f"ratio torch/faiss: best {best_t / best_f:.2f}x, median {med_t / med_f:.2f}x (target <= 1.10x)")
    print(f"neighbours: {identical}/{args.queries} queries identical, {ties} differ only by a similarity tie at rank k")


if __name__ == "__main__":
    main()
