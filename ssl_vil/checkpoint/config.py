"""The run config's ``checkpoint:`` section: how often to save and which checkpoints retention keeps."""

from __future__ import annotations

from dataclasses import dataclass

from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid


@dataclass(kw_only=True, slots=True)
class CheckpointConfig(Config):
    """``every_steps``: save period (plus a save at the end and on preemption); ``keep_last``: newest valid
    checkpoints kept; ``keep_every_steps``: steps that are multiples of it are never deleted (null: none)."""

    every_steps: int = 1000
    keep_last: int = 3
    keep_every_steps: int | None = None

    def validate(self) -> None:
        if self.every_steps <= 0:
            raise invalid("every_steps", self.every_steps, "a positive integer")
        if self.keep_last < 2:
            raise invalid("keep_last", self.keep_last, "at least 2 (the newest is never the only fallback)")
        if self.keep_every_steps is not None and self.keep_every_steps <= 0:
            raise invalid("keep_every_steps", self.keep_every_steps, "a positive number of steps or null")
