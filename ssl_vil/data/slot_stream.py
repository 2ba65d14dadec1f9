"""The sample stream of one slot: raw records window by window, a seeded shuffle, decode, transform, padding.

A slot (see :mod:`ssl_vil.data.layout`) emits exactly one sample per step. Its stream is a webdataset
``DataPipeline`` of four stages::

    window plans -> raw records (tar bytes, not decoded) -> permuted windows -> delivered samples

Shuffling: the slot's positions are cut into windows of ``window`` samples; each window's raw records are
permuted with a seed from ``(seed, epoch, slot, window index)`` (resampled: ``(seed, slot, draw, window)``)
before anything is decoded. A deterministic, bounded shuffle buffer of raw bytes: memory per slot is one window
of encoded samples, and resuming at any step only re-reads the window that contains it.

Augmentation: each sample's transform gets a fresh ``torch.Generator`` seeded from ``(seed, epoch, key)``
(resampled: ``(seed, slot, draw, key)``), so its views depend neither on the worker that runs it nor on the
topology.

Bad records and padding: a position whose record cannot be delivered (see :data:`ERROR_CATEGORIES`) is filled
with a copy of the first good sample after it in the slot's emission order, wrapping to the slot's start and
then to the following slots; the copy is marked ``padded`` and ``lost``. The epoch's final padding entries
(slots holding ``S - 1`` samples) are filled the same way, marked ``padded`` only. The rule depends on the data
alone, so a resumed run pads exactly like an uninterrupted one. Issues are counted when the position that
carries them is delivered, so each is counted once.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import webdataset as wds

from ssl_vil.data.decode import SampleIssue, decode_record
from ssl_vil.data.errors import DataError, DataIssue
from ssl_vil.data.layout import EpochLayout, Piece, ResampledSlot
from ssl_vil.data.seeding import make_generator, permutation, stable_seed
from ssl_vil.data.tar_records import PieceReader

if TYPE_CHECKING:
    from ssl_vil.data.folder_records import FolderListing

# A resampled slot gives up looking for a good sample to pad with after this many consecutive shard draws.
MAX_RESAMPLED_FILL_DRAWS = 64

Transform = Callable[[Any, Any], Any]


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What every slot of one training stream shares."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    mode: str  # "epoch" | "resampled"
    window: int
    global_batch: int
    transform: Transform
    max_pixels: int
    folder: FolderListing | None = None  # set when the "shards" are the chunks of an image folder


@dataclass(slots=True)
class Entry:
    """One position of a slot: the raw record there and, once realised, its label and augmented views."""

    index: int  # emission index in the slot stream = the step at which it is delivered
    url: str
    record: int
    key: str | None
    members: dict[str, bytes] | None
    error: DataIssue | None
    events: tuple[DataIssue, ...]
    seed: int
    label: int = -1
    views: Any = None
    realized: bool = False

    @property
    def good(self) -> bool:
        return self.realized and self.error is None


@dataclass(frozen=True, slots=True)
class SlotOutput:
    """What a slot delivers at one step (``lost_url`` names the shard of a lost position)."""

    key: str
    label: int
    views: Any
    padded: bool
    lost: bool
    events: tuple[DataIssue, ...]
    lost_url: str | None


@dataclass(frozen=True, slots=True)
class WindowPlan:
    first_index: int
    pieces: tuple[Piece, ...]
    perm_seed: int
    draw: int
    sample_seed_parts: tuple[object, ...]


@dataclass(slots=True)
class Window:
    entries: list[Entry]  # in emission order
    draw: int


class SlotStream:
    """Steps ``start .. stop-1`` of slot ``slot`` (epoch mode needs ``layout``; resampled mode builds its draws)."""

    def __init__(
        self,
        spec: StreamSpec,
        slot: int,
        *,
        start: int,
        stop: int,
        epoch: int = 0,
        layout: EpochLayout | None = None,
    ) -> None:
        if spec.mode == "epoch" and layout is None:
            raise ValueError("epoch mode needs the epoch's layout")
        self.spec = spec
        self.slot = slot
        self.start = start
        self.stop = stop
        self.epoch = epoch
        self.layout = layout
        self._resampled = ResampledSlot(spec.counts, seed=spec.seed, slot=slot) if spec.mode == "resampled" else None
        self._fallback: Entry | None = None

    def __iter__(self) -> Iterator[SlotOutput]:
        return iter(wds.DataPipeline(self._windows(self.slot, self.start), self._emit))

    # -- stages ----------------------------------------------------------------------------------------------

    def _windows(self, slot: int, start: int) -> wds.DataPipeline:
        """Permuted windows of ``slot`` from the one holding position ``start`` on."""
        plans = partial(self._resampled_plans, start) if self._resampled is not None else partial(
            self._epoch_plans, slot, start
        )
        return wds.DataPipeline(plans, self._read, self._permute)

    def _epoch_plans(self, slot: int, start: int) -> Iterator[WindowPlan]:
        assert self.layout is not None
        k = self.spec.window
        length = self.layout.slot_lengths[slot]
        for m in range(start // k, math.ceil(length / k)):
            first, stop = m * k, min((m + 1) * k, length)
            yield WindowPlan(
                first,
                tuple(self.layout.pieces(slot, first, stop)),
                stable_seed(self.spec.seed, "window", self.epoch, slot, m),
                0,
                ("sample", self.epoch),
            )

    def _resampled_plans(self, start: int) -> Iterator[WindowPlan]:
        draws = self._resampled
        assert draws is not None
        k = self.spec.window
        draw, offset = draws.locate(start)
        m = offset // k
        while True:
            shard = draws.draw(draw)
            count = self.spec.counts[shard]
            base = draws.draw_start(draw)
            while m * k < count:
                first, stop = m * k, min((m + 1) * k, count)
                yield WindowPlan(
                    base + first,
                    (Piece(shard, first, stop, base + first),),
                    stable_seed(self.spec.seed, "resampled-window", self.slot, draw, m),
                    draw,
                    ("resampled-sample", self.slot, draw),
                )
                m += 1
            draw += 1
            m = 0

    def _read(self, plans: Iterator[WindowPlan]) -> Iterator[tuple[WindowPlan, list[Entry]]]:
        """Raw records of each window, keeping the current shard open across windows."""
        folder = self.spec.folder
        open_shard = folder.open_chunk if folder is not None else None
        with closing(PieceReader(self.spec.urls, self.spec.counts, open_shard)) as reader:
            for plan in plans:
                entries: list[Entry] = []
                for piece in plan.pieces:
                    url = self.spec.urls[piece.shard]
                    for rec in reader.read(piece.shard, piece.start, piece.stop):
                        seed = stable_seed(self.spec.seed, *plan.sample_seed_parts, rec.key)
                        # A folder record's issues and losses name its file rather than the virtual chunk.
                        entries.append(Entry(-1, rec.source or url, rec.index, rec.key, rec.members, rec.error,
                                             rec.events, seed))
                yield plan, entries

    def _permute(self, windows: Iterator[tuple[WindowPlan, list[Entry]]]) -> Iterator[Window]:
        for plan, entries in windows:
            order = permutation(len(entries), plan.perm_seed)
            emitted = [entries[i] for i in order]
            for j, entry in enumerate(emitted):
                entry.index = plan.first_index + j
            yield Window(emitted, plan.draw)

    def _emit(self, windows: Iterator[Window]) -> Iterator[SlotOutput]:
        ahead: deque[Window] = deque()
        upstream = iter(windows)
        while True:
            window = ahead.popleft() if ahead else next(upstream, None)
            if window is None:
                break
            for j, entry in enumerate(window.entries):
                if entry.index < self.start:
                    continue
                if entry.index >= self.stop:
                    return
                yield self._deliver(entry, window, j, ahead, upstream)
        # Epoch mode only (resampled windows never run out): padding entries after the slot's real samples.
        assert self.layout is not None
        for _ in range(max(self.layout.slot_lengths[self.slot], self.start), self.stop):
            fill = self._fallback_fill()
            yield SlotOutput(fill.key or "", fill.label, fill.views, True, False, (), None)

    # -- delivery --------------------------------------------------------------------------------------------

    def _realize(self, entry: Entry) -> None:
        """Decode and transform ``entry`` once; a bad record becomes an error on the entry."""
        if entry.realized or entry.error is not None:
            return
        assert entry.members is not None and entry.key is not None
        try:
            image, label = decode_record(
                entry.members, url=entry.url, record=entry.record, key=entry.key, max_pixels=self.spec.max_pixels
            )
        except SampleIssue as exc:
            entry.error = exc.issue
            entry.events = entry.events + (exc.issue,)
            entry.members = None
            return
        try:
            views = self.spec.transform(image, make_generator(entry.seed))
        except Exception as exc:  # a failing transform is a code/config problem: stop, naming the sample
            raise DataError(
                f"transform failed on sample {entry.key!r} (record {entry.record} of {entry.url}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        entry.label, entry.views, entry.realized, entry.members = label, views, True, None

    def _deliver(
        self, entry: Entry, window: Window, j: int, ahead: deque[Window], upstream: Iterator[Window]
    ) -> SlotOutput:
        self._realize(entry)
        if entry.good:
            assert entry.key is not None
            return SlotOutput(entry.key, entry.label, entry.views, False, False, entry.events, None)
        fill = self._search_forward(window, j, ahead, upstream) or self._fallback_fill()
        return SlotOutput(fill.key or "", fill.label, fill.views, True, True, entry.events, entry.url)

    def _first_good(self, entries: list[Entry]) -> Entry | None:
        for candidate in entries:
            self._realize(candidate)
            if candidate.good:
                return candidate
        return None

    def _search_forward(
        self, window: Window, j: int, ahead: deque[Window], upstream: Iterator[Window]
    ) -> Entry | None:
        """First good entry after position ``j`` of ``window`` in emission order, pulling windows as needed."""
        found = self._first_good(window.entries[j + 1 :])
        for later in ahead:
            found = found or self._first_good(later.entries)
        draws = {window.draw}
        while found is None:
            later = next(upstream, None)
            if later is None:
                return None
            ahead.append(later)
            draws.add(later.draw)
            if self._resampled is not None and len(draws) > MAX_RESAMPLED_FILL_DRAWS:
                raise DataError(
                    f"slot {self.slot}: no decodable sample in {MAX_RESAMPLED_FILL_DRAWS} consecutive shard draws "
                    f"(last: {later.entries[0].url if later.entries else '?'})"
                )
            found = self._first_good(later.entries)
        return found

    def _fallback_fill(self) -> Entry:
        """First good sample of this slot from its start, else of the following slots (cyclically)."""
        if self._fallback is None:
            assert self.layout is not None
            total = self.layout.global_batch
            for k in range(total):
                other = (self.slot + k) % total
                for window in self._windows(other, 0):
                    found = self._first_good(window.entries)
                    if found is not None:
                        self._fallback = found
                        break
                if self._fallback is not None:
                    break
            else:
                raise DataError(
                    f"no decodable sample in the whole epoch {self.epoch}; nothing to pad slot {self.slot} with"
                )
        return self._fallback
