"""k-NN core: parity with a naive loop implementation, torch == faiss, distributed == single-process."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from ssl_vil.eval import knn_search as knn


def _random_problem(seed: int, n_train: int, n_query: int, dim: int, num_classes: int):
    g = torch.Generator().manual_seed(seed)
    train = F.normalize(torch.randn(n_train, dim, generator=g), dim=1)
    query = F.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    train_labels = torch.randint(0, num_classes, (n_train,), generator=g)
    query_labels = torch.randint(0, num_classes, (n_query,), generator=g)
    return query, query_labels, train, train_labels


def _naive_knn(query, query_labels, train, train_labels, k, temperature, num_classes):
    """Plain-Python reference: loops over every (query, train) pair, exp(sim / T) weighted vote."""
    q_rows, t_rows = query.double().tolist(), train.double().tolist()
    t_labels, q_labels = train_labels.tolist(), query_labels.tolist()
    top1 = top5 = 0
    for qi, q in enumerate(q_rows):
        sims = []
        for ti, t in enumerate(t_rows):
            sims.append((sum(a * b for a, b in zip(q, t)), ti))
        sims.sort(key=lambda p: -p[0])
        votes = [0.0] * num_classes
        for sim, ti in sims[: min(k, len(t_rows))]:
            votes[t_labels[ti]] += math.exp(sim / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        top1 += ranking[0] == q_labels[qi]
        top5 += q_labels[qi] in ranking[:5]
    return top1, top5


@pytest.mark.parametrize(
    ("n_train", "n_query", "num_classes", "ks", "temperature"),
    [
        (300, 60, 7, (1, 10, 20, 100, 200), 0.07),
        (300, 60, 7, (5, 20), 0.5),
        (300, 60, 7, (3, 20), 0.02),
        (40, 17, 3, (10, 20, 100), 0.07),  # < 5 classes, < 100 queries, k > n_train
    ],
)
def test_knn_matches_naive_reference(n_train, n_query, num_classes, ks, temperature):
    query, qlab, train, tlab = _random_problem(n_train + n_query, n_train, n_query, 16, num_classes)
    results = knn.knn_classify(query, qlab, train, tlab, list(ks), temperature=temperature)
    assert [r.k for r in results] == list(ks)
    for r in results:
        expected_top1, expected_top5 = _naive_knn(query, qlab, train, tlab, r.k, temperature, num_classes)
        assert (r.top1_correct, r.top5_correct, r.total) == (expected_top1, expected_top5, n_query), r
        assert r.k_effective == min(r.k, n_train)
    if num_classes <= 5:
        assert all(r.top5 == 100.0 for r in results)


def test_grouped_topk_equals_topk():
    g = torch.Generator().manual_seed(3)
    for n in (32 * 40, 32 * 40 + 13, 50):  # exact groups, ragged tail, fewer groups than k
        scores = torch.randn(9, n, generator=g)
        values, cols = knn._grouped_topk(scores, 20)
        ref_values, ref_cols = scores.topk(20, dim=1)
        assert torch.equal(values, ref_values)
        assert torch.equal(cols, ref_cols)


def test_search_torch_chunking_is_exact():
    query, _, train, _ = _random_problem(5, 2000, 70, 24, 4)
    full_sims, full_idx = (query @ train.T).topk(25, dim=1)
    # A tiny chunk budget forces one query per chunk.
    sims, idx = knn.search_torch(query, train, 25, chunk_bytes=1)
    assert torch.equal(idx, full_idx)
    torch.testing.assert_close(sims, full_sims, rtol=0, atol=1e-6)


def test_torch_and_faiss_backends_agree():
    pytest.importorskip("faiss")
    # Enough train rows for the grouped top-k path (> 32 * k) plus a ragged tail.
    query, qlab, train, tlab = _random_problem(11, 32 * 150 + 7, 120, 32, 10)
    t_sims, t_idx = knn.search(query, train, 100, backend="torch")
    f_sims, f_idx = knn.search(query, train, 100, backend="faiss")
    assert torch.equal(t_idx, f_idx)
    torch.testing.assert_close(t_sims, f_sims, rtol=0, atol=1e-5)
    ks = [10, 20, 100]
    by_torch = knn.knn_classify(query, qlab, train, tlab, ks, backend="torch")
    by_faiss = knn.knn_classify(query, qlab, train, tlab, ks, backend="faiss")
    assert by_torch == by_faiss
    # Per-query predictions, not only the counts.
    for k in ks:
        nb_t = knn.find_neighbours(query, train, tlab, k, backend="torch")
        nb_f = knn.find_neighbours(query, train, tlab, k, backend="faiss")
        pred_t = knn.class_scores(nb_t, k, 10, 0.07).argmax(1)
        pred_f = knn.class_scores(nb_f, k, 10, 0.07).argmax(1)
        assert torch.equal(pred_t, pred_f)


def test_bad_inputs_raise_clear_errors():
    query, qlab, train, tlab = _random_problem(0, 20, 5, 8, 3)
    with pytest.raises(ValueError, match="negative label"):
        knn.knn_classify(query, qlab, train, tlab - 1, [5])
    with pytest.raises(ValueError, match="temperature"):
        knn.knn_classify(query, qlab, train, tlab, [5], temperature=0.0)
    with pytest.raises(ValueError, match="k must be"):
        knn.search_torch(query, train, 21)
    with pytest.raises(ValueError, match="bank_labels"):
        knn.find_neighbours(query, train, tlab[:-1], 3)


# Uneven shards: rank 1 holds fewer train rows than k and more queries than rank 0.
_SPLITS = {"train": (290, 10), "query": (13, 37)}


def _distributed_worker(rank: int, world: int, out_dir: str) -> None:
    from gloo_group import gloo_group

    with gloo_group(rank, world, os.path.join(out_dir, "rendezvous")):
        query, qlab, train, tlab = _random_problem(21, 300, 50, 16, 6)
        t0 = sum(_SPLITS["train"][:rank])
        q0 = sum(_SPLITS["query"][:rank])
        t_sl = slice(t0, t0 + _SPLITS["train"][rank])
        q_sl = slice(q0, q0 + _SPLITS["query"][rank])
        out = {}
        for backend in knn.BACKENDS:
            nb = knn.find_neighbours(query[q_sl], train[t_sl], tlab[t_sl], 20, backend=backend)
            res = knn.knn_classify(query[q_sl], qlab[q_sl], train[t_sl], tlab[t_sl], [1, 20, 200], backend=backend)
            out[backend] = (nb.sims, nb.labels, [(r.k, r.k_effective, r.top1_correct, r.top5_correct, r.total)
                                                 for r in res])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_distributed_equals_single_process(tmp_path):
    pytest.importorskip("faiss")
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    query, qlab, train, tlab = _random_problem(21, 300, 50, 16, 6)
    for backend in knn.BACKENDS:
        single = knn.find_neighbours(query, train, tlab, 20, backend=backend)
        single_res = [(r.k, r.k_effective, r.top1_correct, r.top5_correct, r.total)
                      for r in knn.knn_classify(query, qlab, train, tlab, [1, 20, 200], backend=backend)]
        sims = torch.cat([out[0][backend][0], out[1][backend][0]])
        labels = torch.cat([out[0][backend][1], out[1][backend][1]])
        torch.testing.assert_close(sims, single.sims, rtol=0, atol=1e-6)
        assert torch.equal(labels, single.labels), backend
        # Counts are all-reduced, so both ranks report the global figures.
        assert out[0][backend][2] == out[1][backend][2] == single_res, backend
        assert single_res[2][1] == 200 and single_res[0][4] == 50


def test_feature_extraction_rejects_a_sample_read_twice():
    from ssl_vil.eval import features

    batches = [{"keys": ["a", "b"], "labels": [0, 1], "images": torch.zeros(2, 3)},
               {"keys": ["c", "a"], "labels": [2, 0], "images": torch.zeros(2, 3)}]
    with pytest.raises(ValueError, match="'a' was delivered twice"):
        features.extract(batches, lambda x: x, device=torch.device("cpu"))
    out = features.extract(batches[:1], lambda x: x + 1.0, device=torch.device("cpu"), normalize=True)
    assert out.keys == ["a", "b"] and torch.equal(out.labels, torch.tensor([0, 1]))
    torch.testing.assert_close(out.features, torch.full((2, 3), 3 ** -0.5))


def test_pooled_feature_specs():
    from ssl_vil.eval import features

    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    cls = features.pooled_features(tokens, "cls")
    assert torch.equal(cls, torch.cat([tokens[:, 0], tokens[:, -1]], dim=1))  # [CLS] = concat(first, last)
    avg = features.pooled_features(tokens, "avg")
    assert torch.equal(avg, tokens.mean(dim=1))
    assert torch.equal(features.pooled_features(tokens, "cls+avg"), torch.cat([cls, avg], dim=1))
    assert torch.equal(features.pooled_features(tokens, "cls", "bilateral_avg"), (tokens[:, 0] + tokens[:, -1]) / 2)
    with pytest.raises(ValueError, match="unknown feature spec"):
        features.pooled_features(tokens, "patch")
