"""Where every sample of the training stream comes from: slots, epoch layouts and resampled draws.

The stream is organised in **slots**: a global batch of ``G = batch_size * world_size`` samples has ``G`` slots
and slot ``q`` contributes one sample per step. Rank ``r`` owns slots ``[r*B, (r+1)*B)``, so the order of the
data is a pure function of ``(seed, epoch, shard list + counts, G)`` and never of the topology: any
``world_size x batch_size`` with the same ``G`` (and any ``num_workers``) yields the same global batches.

Epoch mode (:class:`EpochLayout`): the shard list is permuted with a seed from ``(seed, epoch)``; the shards'
records, concatenated in that order, are cut into ``G`` contiguous regions, one per slot. With ``N`` samples and
``S = ceil(N / G)`` steps the first ``N - G*(S-1)`` slots hold ``S`` samples and the others ``S - 1`` plus one
padding entry at the last step (``drop_last`` instead uses ``S = N // G`` and leaves the tail of the permuted
order out of that epoch). Every sample is thus read by exactly one slot per epoch and every rank runs ``S`` steps.

Resampled mode (:class:`ResampledSlot`): slot ``q`` reads an endless sequence of whole shards, draw ``i`` being
shard ``uniform(seed, q, i)`` among the non-empty ones (sampling with replacement); slot position ``t`` is the
sample emitted at global step ``t``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ssl_vil.data.errors import DataConfigError
from ssl_vil.data.seeding import permutation, stable_seed, uniform_index


@dataclass(frozen=True, slots=True)
class Piece:
    """Records ``start .. stop-1`` of shard ``shard`` (index into the shard list) fill slot positions from ``pos``."""

    shard: int
    start: int
    stop: int
    pos: int


class EpochLayout:
    """The slot regions of one epoch (see the module docstring)."""

    def __init__(
        self,
        counts: tuple[int, ...],
        *,
        seed: int,
        epoch: int,
        global_batch: int,
        drop_last: bool = False,
        samples_per_epoch: int | None = None,
    ) -> None:
        total = sum(counts)
        n = total if samples_per_epoch is None else samples_per_epoch
        if n <= 0 or n > total:
            raise DataConfigError(f"samples_per_epoch={samples_per_epoch} must be in 1..{total} (the shards' total)")
        steps = n // global_batch if drop_last else math.ceil(n / global_batch)
        if steps == 0:
            raise DataConfigError(
                f"{n} samples cannot fill one global batch of {global_batch} with drop_last=True"
            )
        self.global_batch = global_batch
        self.steps = steps
        self.num_real = steps * global_batch if drop_last else n
        self.shard_order = permutation(len(counts), stable_seed(seed, "shard-order", epoch))
        if drop_last:
            lengths = [steps] * global_batch
        else:
            full = n - global_batch * (steps - 1)  # slots that get `steps` real samples (1..G)
            lengths = [steps if q < full else steps - 1 for q in range(global_batch)]
        self.slot_lengths = lengths
        self.slot_starts = [0]
        for length in lengths[:-1]:
            self.slot_starts.append(self.slot_starts[-1] + length)
        self._counts = counts
        self._ends = cumulative_ends(counts, self.shard_order)

    def pieces(self, slot: int, first: int, stop: int) -> list[Piece]:
        """Pieces covering positions ``first .. stop-1`` (within ``slot_lengths[slot]``) of ``slot``."""
        if not 0 <= first <= stop <= self.slot_lengths[slot]:
            raise ValueError(f"positions {first}..{stop} outside slot {slot} of length {self.slot_lengths[slot]}")
        base = self.slot_starts[slot]
        return [
            Piece(p.shard, p.start, p.stop, p.pos - base)
            for p in concatenated_pieces(self._counts, self.shard_order, self._ends, base + first, base + stop)
        ]


def cumulative_ends(counts: tuple[int, ...], order: list[int]) -> list[int]:
    """``ends[k]`` = number of records in shards ``order[0..k]``."""
    ends, running = [], 0
    for shard in order:
        running += counts[shard]
        ends.append(running)
    return ends


def concatenated_pieces(
    counts: tuple[int, ...], order: list[int], ends: list[int], first: int, stop: int
) -> list[Piece]:
    """Pieces of positions ``first .. stop-1`` of the shards' records concatenated in ``order``."""
    out: list[Piece] = []
    v = first
    k = bisect.bisect_right(ends, v)
    while v < stop:
        shard = order[k]
        shard_begin = ends[k] - counts[shard]
        take = min(stop, ends[k]) - v
        if take > 0:
            out.append(Piece(shard, v - shard_begin, v - shard_begin + take, v))
            v += take
        k += 1
    return out


class ResampledSlot:
    """The endless shard draws of one slot in resampled mode; draw ``i`` covers positions ``draw_start(i) ..``."""

    def __init__(self, counts: tuple[int, ...], *, seed: int, slot: int) -> None:
        self._nonempty = [i for i, c in enumerate(counts) if c > 0]
        if not self._nonempty:
            raise DataConfigError("every shard is empty; nothing to resample from")
        self._counts = counts
        self._seed = seed
        self.slot = slot
        self._starts = [0]  # _starts[i] = first position of draw i (grown on demand)

    def draw(self, i: int) -> int:
        """Shard index of draw ``i``."""
        return self._nonempty[uniform_index(len(self._nonempty), stable_seed(self._seed, "draw", self.slot, i))]

    def draw_start(self, i: int) -> int:
        while len(self._starts) <= i:
            j = len(self._starts) - 1
            self._starts.append(self._starts[-1] + self._counts[self.draw(j)])
        return self._starts[i]

    def locate(self, pos: int) -> tuple[int, int]:
        """(draw index, offset within that draw) of slot position ``pos``."""
        i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        while self.draw_start(i + 1) <= pos:
            i += 1
        return i, pos - self.draw_start(i)
