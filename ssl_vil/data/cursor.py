"""The position of a stream inside its epochs: ``(epoch, batches consumed)``, shared by every resumable stream."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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

    def load(self, state: Mapping[str, Any], error: type[Exception] = ValueError) -> None:
        consumed = int(state["batches_consumed"])
        if not 0 <= consumed <= self.batches_per_epoch:
            raise error(f"data cursor batches_consumed={consumed} outside 0..{self.batches_per_epoch}")
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
