"""``ckpt_write`` faults: SIGKILL or ENOSPC part-way through a checkpoint save, or SIGKILL before ``LATEST``.

``ckpt_write:step=N[,rank=R],kill_after_fraction=F`` lets ``F`` of the save's payload bytes reach the disk, then
SIGKILLs the process (``F = 1`` fires after the last payload byte, before the manifest); ``enospc=1`` raises
``ENOSPC`` there instead (at half the payload unless ``kill_after_fraction`` says otherwise);
``kill_before_latest=1`` SIGKILLs after the finished folder got its final name, before ``LATEST`` is rewritten.
``kill:step=N,at=after_checkpoint`` SIGKILLs right after save ``N`` returned.

Seams: ``CheckpointManager.save`` (which save, which rank) and the module globals ``write_file_durably`` (payload
files and manifest) and ``write_text_atomic`` (the ``LATEST`` pointer) of ``ssl_vil.checkpoint.manager``.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faultinject.spec import ENV_VAR, fault_matches, kill_self, process_rank
from faultinject.trainer import maybe_kill

# Module globals of ssl_vil.checkpoint.manager that may write the LATEST pointer (old and new name).
LATEST_WRITERS = ("write_text_atomic", "replace_file_durably")
FAULT_KEYS = {"step", "steps", "rank", "kill_after_fraction", "kill_before_latest", "enospc"}


@dataclass(frozen=True)
class WriteFault:
    """The ``ckpt_write`` arguments for one save (all off when none is planted)."""

    kill_after_fraction: float | None = None
    kill_before_latest: bool = False
    enospc: bool = False

    @classmethod
    def from_args(cls, args: dict[str, str] | None) -> WriteFault:
        if args is None:
            return cls()
        unknown = set(args) - FAULT_KEYS
        if unknown:
            raise ValueError(f"{ENV_VAR} ckpt_write: unknown keys {sorted(unknown)}; known: {sorted(FAULT_KEYS)}")
        fraction = float(args["kill_after_fraction"]) if "kill_after_fraction" in args else None
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{ENV_VAR} ckpt_write: kill_after_fraction must be in [0, 1], got {fraction}")
        return cls(
            kill_after_fraction=fraction,
            kill_before_latest=args.get("kill_before_latest", "0") not in ("0", ""),
            enospc=args.get("enospc", "0") not in ("0", ""),
        )

    @property
    def on_payload(self) -> bool:
        return self.kill_after_fraction is not None or self.enospc


class ByteBudget:
    """``before_chunk`` hook of ``write_file_durably``: lets ``fraction * total`` payload bytes through, then fires
    the fault (SIGKILL, or ``ENOSPC`` when ``enospc=1``)."""

    def __init__(self, fault: WriteFault, *, step: int, tmp: Path, total: int) -> None:
        fraction = fault.kill_after_fraction if fault.kill_after_fraction is not None else 0.5
        self.fault, self.step, self.tmp, self.total = fault, step, tmp, total
        self.limit = int(total * fraction)
        self.written = 0

    def __call__(self, n: int) -> int:
        if self.written >= self.limit:
            if self.fault.enospc:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{self.tmp} ({ENV_VAR})")
            kill_self(f"checkpoint step {self.step} after {self.written} of {self.total} payload bytes")
        n = min(n, self.limit - self.written)
        self.written += n
        return n


class _SaveInProgress:
    def __init__(self, fault: WriteFault, step: int, payload: Mapping[str, Any]) -> None:
        self.fault, self.step, self.payload = fault, step, payload
        self.budget: ByteBudget | None = None

    def byte_budget(self, tmp: Path) -> ByteBudget:
        if self.budget is None:
            from ssl_vil.checkpoint.payload import serialize

            # The fault fires at a byte position of the whole payload, so its size is needed up front;
            # torch.save output is deterministic, so this is the size the manager writes.
            total = sum(len(serialize(obj)) for obj in self.payload.values())
            self.budget = ByteBudget(self.fault, step=self.step, tmp=tmp, total=total)
        return self.budget


_save: _SaveInProgress | None = None


def wrap_save(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def save(self: Any, step: int, payload: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        global _save
        fault = WriteFault.from_args(fault_matches("ckpt_write", step=step, rank=getattr(self, "rank", 0)))
        outer, _save = _save, _SaveInProgress(fault, step, payload)
        try:
            result = original(self, step, payload, *args, **kwargs)
        finally:
            _save = outer
        maybe_kill("after_checkpoint", step=step, rank=process_rank())
        return result

    return save


def wrap_write_file_durably(original: Callable[..., Any], payload_suffix: str,
                            manifest_name: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def write_file_durably(path: Path, data: Any, *, before_chunk: Callable[[int], int] | None = None) -> None:
        current = _save
        if current is not None and current.fault.on_payload:
            name = Path(path).name
            if name.endswith(payload_suffix):
                budget = current.byte_budget(Path(path).parent)
                inner = before_chunk
                before_chunk = budget if inner is None else (lambda n: inner(budget(n)))
            elif name == manifest_name:
                current.byte_budget(Path(path).parent)(0)  # a budget ending at the last byte fires here
        return original(path, data, before_chunk=before_chunk)

    return write_file_durably


def wrap_latest_writer(original: Callable[..., Any], latest_name: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def write_latest(path: Path, *args: Any, **kwargs: Any) -> Any:
        current = _save
        if current is not None and current.fault.kill_before_latest and Path(path).name == latest_name:
            kill_self(f"checkpoint step {current.step} renamed into place, {latest_name} not yet updated")
        return original(path, *args, **kwargs)

    return write_latest
