"""TensorBoard scalars of a run (``RUN/tb``), written by rank 0; shared by the pretraining metrics logger and the
supervised runs (fine-tuning, segmentation).

The writer (a slow import) is created on the first scalar. A resume from step ``S`` hides the events after ``S``
that an interrupted run had already written (``purge_step``), as the JSONL logs are cut back to ``S``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

TB_DIR = "tb"


class ScalarBoard:
    """``add({"loss/loss": 2.3, ...}, step)``; a no-op when disabled (other ranks, ``tensorboard: false``)."""

    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int = 0) -> None:
        self.log_dir = Path(run_dir) / TB_DIR
        self.enabled = enabled
        self._writer: Any = None
        self._purge_step: int | None = start_step + 1 if start_step > 0 else None

    def add(self, tags: Mapping[str, Any], step: int) -> None:
        """Write the numeric values of ``tags`` at ``step`` (others, e.g. None or lists, are skipped)."""
        tags = {k: v for k, v in tags.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not self.enabled or not tags:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self._purge_step)
        for tag, value in tags.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def purge_after(self, step: int) -> None:
        """Hide the events after ``step`` from the next writer on (a resume from ``step``)."""
        self._purge_step = step + 1
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
