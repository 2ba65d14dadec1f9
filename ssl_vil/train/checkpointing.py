"""The trainer's checkpoint policy: when to save, what a save holds, and how a resume restores it.

A save is one :class:`~ssl_vil.checkpoint.CheckpointManager` folder with the payload files

* ``objective``   student, teacher and loss centers;
* ``optimizer``   AdamW state;
* ``grad_scaler`` fp16 loss-scale state (only when loss scaling is on);
* ``train_state`` the step and sample counters, every stateful loop component (data cursor, guards) and the RNG
  streams of every rank: what a bitwise-exact continuation needs besides the model and the optimizer.

Components are registered by name; anything with ``state_dict()`` / ``load_state_dict()`` qualifies. Each manifest
records the resolved config under ``metadata["config"]``, so a resume can be checked against the config the
state was computed with even when ``RUN/config.yaml`` is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ssl_vil.checkpoint import (CheckpointError, CheckpointManager, LoadedCheckpoint, capture_rng_state,
                                restore_rng_state)
from ssl_vil.infra.dist import all_gather_object, barrier, is_distributed
from ssl_vil.infra.timing import is_due


# Manifest metadata key holding the resolved config a checkpoint was written with.
CONFIG_METADATA_KEY = "config"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Progress:
    """The loop's counters; saved in ``train_state``."""

    step: int = 0
    samples_seen: int = 0


class Checkpointer:
    """Saves every ``every_steps``, at the last step and on preemption; restores the newest verified save.

    ``payload`` components become payload files of their own; ``loop_state`` components go into ``train_state``
    (a disabled one may be None and saves as ``{}``). ``also_due(step, batch)`` adds save points of the task's
    own (the end of each epoch of a fine-tune). ``upgrade(loaded)`` rewrites, in place, a checkpoint written in an
    older layout (one without ``train_state``) into this one before anything is restored from it.
    """

    def __init__(self, manager: CheckpointManager, *, every_steps: int, total_steps: int,
                 payload: dict[str, Stateful], loop_state: dict[str, Stateful | None],
                 config_record: dict[str, Any] | None = None,
                 also_due: Callable[[int, Any], bool] | None = None,
                 upgrade: Callable[[LoadedCheckpoint], None] | None = None) -> None:
        self.manager, self.every_steps, self.total_steps = manager, every_steps, total_steps
        self.payload, self.loop_state = payload, loop_state
        self.config_record = config_record
        self.also_due, self.upgrade = also_due, upgrade

    @classmethod
    def for_run(cls, run_dir: Path, cfg: Any, *, config_hash: str, world_size: int, rank: int, git_sha: str | None,
                payload: dict[str, Stateful], loop_state: dict[str, Stateful | None],
                config_record: dict[str, Any] | None = None) -> Checkpointer:
        """``config_record``: the resolved config as plain data, stored in every manifest."""
        c = cfg.checkpoint
        manager = CheckpointManager(run_dir, keep_last=c.keep_last, keep_every_steps=c.keep_every_steps,
                                    config_hash=config_hash, world_size=world_size, git_sha=git_sha, rank=rank,
                                    barrier=barrier if is_distributed() else None)
        return cls(manager, every_steps=c.every_steps, total_steps=cfg.derived.total_steps, payload=payload,
                   loop_state=loop_state, config_record=config_record)

    @property
    def fallbacks(self) -> int:
        """Checkpoints skipped at load because they failed verification."""
        return self.manager.fallbacks

    def due(self, step: int, batch: Any = None, *, stop: bool = False) -> bool:
        """Save after ``step`` (which consumed ``batch``)? On a stop, every ``every_steps``, at the last step, and
        where ``also_due`` says."""
        return (stop or is_due(step, self.every_steps, total_steps=self.total_steps)
                or (self.also_due is not None and self.also_due(step, batch)))

    def save(self, progress: Progress) -> Path:
        """Collective when distributed: every rank contributes its RNG streams."""
        train_state = {"step": progress.step, "samples_seen": progress.samples_seen}
        train_state |= {name: c.state_dict() if c is not None else {} for name, c in self.loop_state.items()}
        train_state["rng"] = _gather_rng()
        payload = {name: c.state_dict() for name, c in self.payload.items()} | {"train_state": train_state}
        metadata: dict[str, Any] = {"samples_seen": progress.samples_seen}
        if self.config_record is not None:
            metadata[CONFIG_METADATA_KEY] = self.config_record
        return self.manager.save(progress.step, payload, metadata=metadata)

    def restore(self, progress: Progress, rank: int, *,
                check: Callable[[LoadedCheckpoint], None] | None = None) -> LoadedCheckpoint | None:
        """Load the newest verified checkpoint into the components and ``progress``; None on a fresh run.

        ``check(loaded)`` runs before any component is touched (e.g. to refuse an incompatible config).
        """
        loaded = self.manager.load_latest()
        if loaded is None:
            return None
        if check is not None:
            check(loaded)
        if "train_state" not in loaded.payload and self.upgrade is not None:
            self.upgrade(loaded)
        missing = [name for name in self.payload if name not in loaded.payload]
        if missing:
            raise CheckpointError(f"{loaded.path} holds no {' / '.join(missing)} state, which this run needs "
                                  f"(it holds {', '.join(sorted(loaded.payload))}): it was written by a run "
                                  f"configured differently")
        for name, component in self.payload.items():
            component.load_state_dict(loaded.payload[name])
        st = loaded.payload["train_state"]
        progress.step, progress.samples_seen = int(st["step"]), int(st["samples_seen"])
        for name, component in self.loop_state.items():
            if component is not None:
                component.load_state_dict(st[name])
        # Per-rank RNG streams (drop path) continue exactly on the same world size; on another one, ranks reuse
        # the saved streams cyclically. Restored last: loading the components above must not draw from them.
        rng = st["rng"]
        if rng is not None:  # None: a checkpoint from before the RNG streams were saved (see ``upgrade``)
            restore_rng_state(rng[rank % len(rng)] if isinstance(rng, list) else rng)
        return loaded


def _gather_rng() -> list[dict[str, Any]] | dict[str, Any]:
    state = capture_rng_state()
    return all_gather_object(state) if is_distributed() else state

