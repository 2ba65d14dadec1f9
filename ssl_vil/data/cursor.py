"""The position of a stream inside its epochs, ``(epoch, batches consumed)``, and the resumable-stream protocol
built on it (:class:`ResumableStream`), shared by every resumable training stream."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from typing import Any, ClassVar

from ssl_vil.data.errors import DataConfigError


class EpochCursor:
    """Where the next batch comes from. A finished epoch reads as the start of the next one, so a cursor saved
    at an epoch boundary and one saved at the first batch of the next epoch are the same state."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch
        self._epoch = 0
        self._consumed = 0

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._epoch + (1 if self._consumed >= self.batches_per_epoch else 0)

    @property
    def batches_consumed(self) -> int:
        """Batches of :attr:`epoch` already yielded."""
        return 0 if self._consumed >= self.batches_per_epoch else self._consumed

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load(self, state: Mapping[str, Any]) -> None:
        consumed = int(state["batches_consumed"])
        if not 0 <= consumed <= self.batches_per_epoch:
            raise DataConfigError(f"data cursor batches_consumed={consumed} outside 0..{self.batches_per_epoch}")
        self._epoch, self._consumed = int(state["epoch"]), consumed

    def begin(self) -> tuple[int, int]:
        """Start (or continue) an epoch pass: ``(epoch, first batch index)``."""
        self._epoch, self._consumed = self.epoch, self.batches_consumed
        return self._epoch, self._consumed

    def yielded(self, index: int) -> None:
        """Batch ``index`` of the current epoch has been handed out."""
        self._consumed = index + 1

    def end(self, epoch: int) -> None:
        """The pass over ``epoch`` is complete."""
        self._epoch, self._consumed = epoch + 1, 0


class ResumableStream:
    """Base of the training streams whose position is an :class:`EpochCursor` (shards, ImageFolder).

    One cursor protocol for all of them: ``epoch`` / ``batches_consumed`` / ``batches_per_epoch`` read the cursor;
    ``state_dict()`` is ``{"format", "epoch", "batches_consumed", <fingerprint>}`` and ``load_state_dict`` refuses
    a state of another format or whose fingerprint (everything the sample order depends on: data, seed, global
    batch size ...) differs, with :class:`ssl_vil.data.errors.DataConfigError` naming each differing field.
    Iterating yields the rest of the current epoch from the cursor, then moves the cursor to the next epoch.

    Subclasses set ``batch_size``, ``world_size`` and ``_cursor`` and implement :meth:`_fingerprint` and
    :meth:`_epoch_batches`; :meth:`_deliver` may inspect each batch after the cursor has counted it.
    """

    cursor_format: ClassVar[str]
    stream_name: ClassVar[str] = "stream"
    batch_size: int
    world_size: int
    _cursor: EpochCursor

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Steps per epoch, equal on every rank."""
        return self._cursor.batches_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (a finished epoch counts as the start of the next)."""
        return self._cursor.epoch

    @property
    def batches_consumed(self) -> int:
        """Batches of :attr:`epoch` already yielded."""
        return self._cursor.batches_consumed

    def __len__(self) -> int:
        return self._cursor.batches_per_epoch

    def _fingerprint(self) -> dict[str, Any]:
        """The fields a saved cursor must match to continue the same sample order."""
        raise NotImplementedError

    def _epoch_batches(self, epoch: int, first: int) -> Generator[dict[str, Any], None, None]:
        """Batches ``first, first + 1, ...`` of ``epoch``, to the end of the epoch."""
        raise NotImplementedError

    def _deliver(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The cursor and the fingerprint; the same on every rank, with no topology in it."""
        return {"format": self.cursor_format, **self._cursor.state(), **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved cursor; refuses one whose sample order differs (other data, seed, G ...)."""
        if state.get("format") != self.cursor_format:
            raise DataConfigError(f"data cursor format {state.get('format')!r}, expected {self.cursor_format!r}")
        mine = self._fingerprint()
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise DataConfigError(f"data cursor does not match this {self.stream_name}: " + "; ".join(diff))
        self._cursor.load(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, first = self._cursor.begin()
        batches = self._epoch_batches(epoch, first)
        try:
            for index, batch in enumerate(batches, start=first):
                self._cursor.yielded(index)
                yield self._deliver(batch)
        finally:
            batches.close()
        self._cursor.end(epoch)
