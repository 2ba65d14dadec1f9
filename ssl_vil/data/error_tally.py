"""Counting data issues per category, reporting first occurrences, and enforcing the error budget.

Workers attach the issues they meet to the outputs they deliver; the rank's main process tallies them here, adds
the per-batch deltas to ``batch["data_errors"]`` (always every category of :data:`ERROR_CATEGORIES` plus
``lost_samples``, in that order, so ranks can all-reduce them with :func:`reduce_error_counts`), logs each
category once with its shard URL and key, and raises :class:`DataErrorBudgetExceeded` when the samples lost in
the current epoch exceed ``budget_fraction`` of the samples the rank planned for it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping

from typing import Any

import torch

from ssl_vil.data.errors import ERROR_CATEGORIES, LOST_SAMPLES, DataErrorBudgetExceeded, DataIssue
from ssl_vil.infra.dist import all_reduce_, collective_device, is_distributed

logger = logging.getLogger("ssl_vil.data")

COUNTER_KEYS: tuple[str, ...] = ERROR_CATEGORIES + (LOST_SAMPLES,)


def zero_counts() -> dict[str, int]:
    return {key: 0 for key in COUNTER_KEYS}


class ErrorTally:
    """Issue counters of one rank's stream (lifetime totals and the current epoch's losses per shard)."""

    def __init__(self, *, budget_fraction: float | None, planned_per_epoch: int, rank: int) -> None:
        if budget_fraction is not None and not 0.0 <= budget_fraction <= 1.0:
            raise ValueError(f"error_budget_fraction must be in [0, 1] or None, got {budget_fraction}")
        self.budget_fraction = budget_fraction
        self.planned_per_epoch = planned_per_epoch
        self.rank = rank
        self.totals = Counter({key: 0 for key in COUNTER_KEYS})
        self.first: dict[str, DataIssue] = {}
        self._epoch_lost: Counter[str] = Counter()
        self._epoch_issues: Counter[tuple[str, str]] = Counter()

    def new_epoch(self) -> None:
        self._epoch_lost.clear()
        self._epoch_issues.clear()

    def add(self, events: Iterable[DataIssue], lost_urls: Iterable[str]) -> tuple[dict[str, int], list[dict]]:
        """Count one batch's issues; returns (deltas by counter key, details of first occurrences per category)."""
        deltas = zero_counts()
        details: list[dict] = []
        for issue in events:
            deltas[issue.category] += 1
            self._epoch_issues[(issue.url, issue.category)] += 1
            if issue.category not in self.first:
                self.first[issue.category] = issue
                details.append(issue.as_dict())
                logger.warning("rank %d data issue (first of its kind): %s", self.rank, issue.describe())
        for url in lost_urls:
            deltas[LOST_SAMPLES] += 1
            self._epoch_lost[url] += 1
        self.totals.update(deltas)
        return deltas, details

    @property
    def epoch_lost(self) -> int:
        return sum(self._epoch_lost.values())

    def check_budget(self) -> None:
        """Raise when this epoch's lost samples exceed the budget, naming the shards that lost the most."""
        if self.budget_fraction is None:
            return
        allowed = self.budget_fraction * self.planned_per_epoch
        lost = self.epoch_lost
        if lost <= allowed:
            return
        worst = []
        for url, n in self._epoch_lost.most_common(5):
            kinds = ", ".join(f"{c}={k}" for (u, c), k in sorted(self._epoch_issues.items()) if u == url)
            worst.append(f"{url} (lost {n}; {kinds or 'no new issue this epoch'})")
        raise DataErrorBudgetExceeded(
            f"rank {self.rank}: {lost} of the {self.planned_per_epoch} samples planned this epoch were lost to bad "
            f"data, above the error budget of {self.budget_fraction:.2%} ({allowed:.1f} samples). Worst shards: "
            + "; ".join(worst)
            + f". Issue totals: { {k: v for k, v in self.totals.items() if v} }. Remove or repair those samples, or "
            f"raise the budget (data.error_budget_fraction in pretraining) if such losses are acceptable"
        )


def reduce_error_counts(counts: Mapping[str, int], group: Any = None) -> dict[str, int]:
    """Sum ``counts`` over the ranks of ``group`` when torch.distributed is initialised (identity otherwise).

    Every rank must pass the same keys (the stream's ``data_errors`` always holds all of them).
    """
    keys = sorted(counts)
    if not is_distributed():
        return {k: int(counts[k]) for k in keys}
    values = torch.tensor([int(counts[k]) for k in keys], dtype=torch.int64, device=collective_device(group))
    all_reduce_(values, "sum", group=group)
    return dict(zip(keys, (int(v) for v in values.tolist())))
