"""Batch collation of multi-view samples.

A collate is ``Callable[[list[dict], torch.Generator], dict]``. Each sample is ``{"key": str, "label": int
(-1 if none), "views": <transform output>}``; the generator is seeded by the stream from (seed, epoch, global
batch index, the rank's first slot), for collates that draw randomness (e.g. masks) per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class StackedSamples:
    """A batch whose views arrive stacked in parts (one part per data worker, parts in sample order).

    keys / labels: B entries. parts: list of P parts; ``parts[p][v]`` is view ``v`` of the part's samples,
    (B_p, ...) with sum(B_p) = B. A collate may offer ``collate_stacked(stacked, generator)`` to concatenate these
    instead of restacking B samples one view at a time.
    """

    keys: list[str]
    labels: list[int]
    parts: list[list[Tensor]]

    def uniform(self) -> bool:
        """Every part has the same number of views, each view one shape and dtype across parts."""
        if not self.parts:
            return False
        signature = [(t.shape[1:], t.dtype) for t in self.parts[0]]
        return all([(t.shape[1:], t.dtype) for t in part] == signature for part in self.parts)

    def view(self, v: int) -> Tensor:
        """View ``v`` of all B samples, (B, ...): the part's own tensor when there is one part (no copy)."""
        if len(self.parts) == 1:
            return self.parts[0][v]
        return torch.cat([part[v] for part in self.parts])

    def samples(self) -> list[dict[str, Any]]:
        """The per-sample form ``{"key", "label", "views": list[Tensor]}`` (views share the parts' memory)."""
        per_part = [list(zip(*part)) for part in self.parts]
        views = [list(v) for rows in per_part for v in rows]
        return [{"key": k, "label": lab, "views": v} for k, lab, v in zip(self.keys, self.labels, views)]


def stack_views(samples: list[dict[str, Any]]) -> Tensor | list[Tensor]:
    """Views of all samples stacked: a tensor -> (B, ...); a list of V tensors -> V tensors of (B, ...)."""
    first = samples[0]["views"]
    if isinstance(first, Tensor):
        return torch.stack([s["views"] for s in samples])
    if isinstance(first, (list, tuple)):
        n = len(first)
        for s in samples:
            if len(s["views"]) != n:
                raise ValueError(f"sample {s['key']!r} has {len(s['views'])} views, sample {samples[0]['key']!r} {n}")
        return [torch.stack([s["views"][i] for s in samples]) for i in range(n)]
    raise TypeError(f"views must be a tensor or a list of tensors, got {type(first).__name__}")


class _ViewsCollate:
    """``{"keys": list[str] (B), "labels": LongTensor (B,), "views": stacked views}`` (the generator is unused).

    Called on samples, or through ``collate_stacked`` on a :class:`StackedSamples` (the same batch)."""

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        del generator
        if not samples:
            raise ValueError("cannot collate an empty batch")
        return {
            "keys": [s["key"] for s in samples],
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "views": stack_views(samples),
        }

    def collate_stacked(self, stacked: StackedSamples, generator: torch.Generator) -> dict[str, Any]:
        del generator
        return {
            "keys": list(stacked.keys),
            "labels": torch.tensor(stacked.labels, dtype=torch.long),
            "views": [stacked.view(v) for v in range(len(stacked.parts[0]))],
        }

    def __repr__(self) -> str:
        return "default_collate_views"


default_collate_views = _ViewsCollate()
