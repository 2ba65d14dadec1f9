"""Step guards: non-finite values, loss / grad-norm spikes, and teacher collapse.

The train step calls them in this order, before ``optimizer.step()``:

1. :class:`FiniteGuard` checks every loss term and the grad norm for NaN / inf. One int32 MIN all-reduce makes the
   verdict global, so all ranks skip (or halt on) the same step; a rank-local decision would let ranks drift apart
   (metaseq #521).
2. :class:`SpikeGuard` compares the globally reduced loss and grad norm to a rolling window (z-score, as in
   llm.c #637). Its inputs are identical on every rank, so its verdict is too, without communication.
3. :class:`CollapseDetector` watches the teacher's entropy ratio H / ln K and stops a run whose teacher has become
   uniform, instead of letting it burn compute for days.

All three keep their counters in ``state_dict()`` so a resumed run takes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.distributed as dist

from ssl_vil.infra.files import write_json_atomic

log = logging.getLogger(__name__)

GRAD_NORM_NAME = "grad_norm"


class NonFiniteError(RuntimeError):
    """A loss term or the grad norm was NaN / inf, and the policy says stop.

    ``step`` is the failing step; ``bad`` maps each offending quantity to the ranks that saw it.
    """

    def __init__(self, message: str, *, step: int, bad: dict[str, list[int]]) -> None:
        super().__init__(message)
        self.step = step
        self.bad = bad


class CollapseError(RuntimeError):
    """The teacher's output distribution stayed near uniform for too long; training cannot recover."""


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _describe(bad: Mapping[str, list[int]]) -> str:
    """``{"ibot": [1], "grad_norm": [0, 1]}`` -> ``"ibot on rank 1; grad_norm on ranks 0, 1"``."""
    parts = []
    for name, ranks in bad.items():
        label = "rank" if len(ranks) == 1 else "ranks"
        parts.append(f"{name} on {label} {', '.join(str(r) for r in ranks)}")
    return "; ".join(parts)


class FiniteGuard:
    """Global finiteness check of the loss terms and grad norm, with a ``skip`` or ``halt`` policy.

    Call :meth:`check` after backward and gradient clipping, before ``optimizer.step()``. Every rank must call it
    at every step with the same term names in the same order (the objective's output dict guarantees that).

    * ``skip``: a bad step returns False on every rank (the caller skips the optimizer step, EMA and centre
      updates); more than ``max_consecutive`` bad steps in a row raise :class:`NonFiniteError`.
    * ``halt``: the first bad step raises :class:`NonFiniteError`.

    On raising, each rank that saw a non-finite value writes its batch keys to
    ``run_dir/nonfinite_step{step}_rank{rank}.json`` so the offending samples can be inspected.
    """

    def __init__(
        self,
        policy: Literal["skip", "halt"],
        max_consecutive: int,
        run_dir: Path,
        rank: int,
    ) -> None:
        if policy not in ("skip", "halt"):
            raise ValueError(f"FiniteGuard policy must be 'skip' or 'halt', got {policy!r}")
        if max_consecutive < 0:
            raise ValueError(f"FiniteGuard max_consecutive must be >= 0, got {max_consecutive}")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.skipped_total = 0
        self.consecutive = 0
        # Offending quantity -> ranks that saw it, for the most recent bad step (empty after a good step); the
        # trainer logs it as an event.
        self.last_report: dict[str, list[int]] = {}

    def check(
        self,
        terms: Mapping[str, torch.Tensor],
        grad_norm: torch.Tensor,
        *,
        step: int,
        batch_keys: list[str],
    ) -> bool:
        """True when every term and the grad norm are finite on every rank.

        Args:
            terms: loss terms by name (any shape; usually 0-d), e.g. ``{"loss", "dino", "ibot", "koleo"}``.
            grad_norm: 0-d total gradient norm (as returned by ``clip_grad_norm_``).
            step: the step being checked, for messages and file names.
            batch_keys: ``__key__`` of this rank's samples, written to disk when the guard raises.
        """
        names = [*terms.keys(), GRAD_NORM_NAME]
        device = grad_norm.device
        # One 0/1 flag per quantity, computed on the device so only the reduced result syncs with the host.
        local = torch.stack(
            [torch.isfinite(t.detach()).all().to(device) for t in terms.values()]
            + [torch.isfinite(grad_norm.detach()).all()]
        ).to(torch.int32)

        if _dist_active():
            world, rank = dist.get_world_size(), dist.get_rank()
            if rank != self.rank:
                raise ValueError(f"FiniteGuard was built for rank {self.rank} but runs on rank {rank}")
            # Row r holds rank r's flags and every other row is 1, so one MIN all-reduce yields both the global
            # verdict and which rank saw what. (int32: NCCL cannot reduce bool.)
            flags = torch.ones(world, len(names), dtype=torch.int32, device=device)
            flags[rank] = local
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            return self.decide(flags.cpu().tolist(), names, step=step, batch_keys=batch_keys)
        return self.decide([local.cpu().tolist()], names, step=step, batch_keys=batch_keys, ranks=[self.rank])

    def decide(self, flags: list[list[int]], names: list[str], *, step: int, batch_keys: list[str],
               ranks: list[int] | None = None) -> bool:
        """The policy applied to a global table of finite flags (row = rank, column = quantity, 0 = non-finite).

        ``ranks`` names the rows (default: row r is rank r). Returns True for a good step, False for a step to
        skip; raises :class:`NonFiniteError` when the policy says stop.
        """
        row_ranks = list(range(len(flags))) if ranks is None else ranks
        flags_host = flags
        my_row = row_ranks.index(self.rank)
        bad = {
            name: [r for r, row in zip(row_ranks, flags_host) if row[i] == 0]
            for i, name in enumerate(names)
            if any(row[i] == 0 for row in flags_host)
        }
        self.last_report = bad
        if not bad:
            self.consecutive = 0
            return True

        local_bad = [name for i, name in enumerate(names) if flags_host[my_row][i] == 0]
        if local_bad:
            shown = ", ".join(batch_keys[:8]) + (f", ... ({len(batch_keys)} keys)" if len(batch_keys) > 8 else "")
            log.warning("non-finite %s on rank %d at step %d; batch keys: %s", ", ".join(local_bad), self.rank,
                        step, shown)

        if self.policy == "halt":
            self._write_keys(step, local_bad, batch_keys)
            raise NonFiniteError(
                f"non-finite values at step {step} (policy halt): {_describe(bad)}. The optimizer step was not "
                f"taken; batch keys of the offending ranks are in {self.run_dir}/nonfinite_step{step}_rank<R>.json",
                step=step,
                bad=bad,
            )

        self.consecutive += 1
        self.skipped_total += 1
        if self.consecutive > self.max_consecutive:
            self._write_keys(step, local_bad, batch_keys)
            raise NonFiniteError(
                f"non-finite values at step {step} (policy skip): {_describe(bad)}; {self.consecutive} bad steps in "
                f"a row exceed max_consecutive={self.max_consecutive} ({self.skipped_total} skipped in total). "
                f"Batch keys of the offending ranks are in {self.run_dir}/nonfinite_step{step}_rank<R>.json",
                step=step,
                bad=bad,
            )
        return False

    def _write_keys(self, step: int, local_bad: list[str], batch_keys: list[str]) -> None:
        """Write this rank's batch keys if this rank saw a non-finite value (atomically: never half-written)."""
        if not local_bad:
            return
        record = {"step": step, "rank": self.rank, "policy": self.policy, "terms": local_bad,
                  "batch_keys": list(batch_keys)}
        write_json_atomic(self.run_dir / f"nonfinite_step{step}_rank{self.rank}.json", record, indent=1)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped_total = int(state["skipped_total"])
        self.consecutive = int(state["consecutive"])


class SpikeGuard:
    """Flags a step whose loss or grad norm is far above the recent accepted steps (one-sided z-score).

    The z-score of each value is taken against the last ``window`` *accepted* steps: a flagged step is not added to
    the history, so one spike cannot widen the band and hide the next. Nothing is flagged until ``min_history``
    steps have been accepted. Only upward deviations count: a sudden drop in loss is not a failure.

    The standard deviation is floored at 0.1% of the mean's magnitude (plus a tiny absolute floor), so a nearly
    constant history does not turn float noise into a spike.

    A spike is a short event; a level that stays high is a change of regime (the grad norm rising through the lr
    warmup, a decoder starting to learn), and skipping it would stop training for good, since flagged steps never
    enter the history. So after ``max_consecutive`` flagged steps in a row the next one is accepted and the history
    restarts from that run of values (logged as a level change).
    """

    _REL_STD_FLOOR = 1e-3
    _ABS_STD_FLOOR = 1e-12

    def __init__(self, window: int = 50, z_threshold: float = 6.0, min_history: int = 20,
                 max_consecutive: int = 5) -> None:
        if window < 2:
            raise ValueError(f"SpikeGuard window must be >= 2 steps, got {window}")
        if not 2 <= min_history <= window:
            raise ValueError(f"SpikeGuard min_history must be in [2, window={window}], got {min_history}")
        if z_threshold <= 0:
            raise ValueError(f"SpikeGuard z_threshold must be > 0, got {z_threshold}")
        if max_consecutive < 1:
            raise ValueError(f"SpikeGuard max_consecutive must be >= 1, got {max_consecutive}")
        self.window = window
        self.z_threshold = z_threshold
        self.min_history = min_history
        self.max_consecutive = max_consecutive
        self._loss: deque[float] = deque(maxlen=window)
        self._grad_norm: deque[float] = deque(maxlen=window)
        self._run: list[tuple[float, float]] = []  # the current run of consecutive flagged (loss, grad norm)
        self.flagged_total = 0
        self.last_z: dict[str, float] = {}

    def _z(self, history: deque[float], value: float) -> float:
        n = len(history)
        mean = sum(history) / n
        var = sum((x - mean) ** 2 for x in history) / (n - 1)
        std = max(math.sqrt(var), self._REL_STD_FLOOR * abs(mean) + self._ABS_STD_FLOOR)
        return (value - mean) / std

    def check(self, loss: float, grad_norm: float, *, step: int) -> bool:
        """True when ``loss`` or ``grad_norm`` (globally reduced floats) is a spike; the caller skips the step."""
        loss, grad_norm = float(loss), float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # FiniteGuard normally catches these first; never let them into the history.
            self.flagged_total += 1
            self.last_z = {"loss": math.inf, "grad_norm": math.inf}
            return True
        if len(self._loss) >= self.min_history:
            self.last_z = {"loss": self._z(self._loss, loss), "grad_norm": self._z(self._grad_norm, grad_norm)}
            if max(self.last_z.values()) > self.z_threshold:
                if len(self._run) < self.max_consecutive:
                    self._run.append((loss, grad_norm))
                    self.flagged_total += 1
                    log.warning("spike at step %d: loss %.4g (z=%.1f), grad norm %.4g (z=%.1f) > z threshold %.1f",
                                step, loss, self.last_z["loss"], grad_norm, self.last_z["grad_norm"],
                                self.z_threshold)
                    return True
                log.warning("step %d: loss %.4g / grad norm %.4g stayed above the band for %d steps: a level "
                            "change, not a spike; the step is taken and the history restarts from these steps",
                            step, loss, grad_norm, len(self._run) + 1)
                self._loss.clear()
                self._grad_norm.clear()
                for old_loss, old_grad_norm in self._run:
                    self._loss.append(old_loss)
                    self._grad_norm.append(old_grad_norm)
        else:
            self.last_z = {}
        self._run = []
        self._loss.append(loss)
        self._grad_norm.append(grad_norm)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "loss": list(self._loss),
            "grad_norm": list(self._grad_norm),
            "flagged_total": self.flagged_total,
            "run": [list(pair) for pair in self._run],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["window"]) != self.window:
            raise ValueError(f"SpikeGuard state has window {state['window']}, this guard has {self.window}")
        self._loss = deque((float(x) for x in state["loss"]), maxlen=self.window)
        self._grad_norm = deque((float(x) for x in state["grad_norm"]), maxlen=self.window)
        self.flagged_total = int(state["flagged_total"])
        # Checkpoints written before the level-change rule have no run: none was in progress for them.
        self._run = [(float(a), float(b)) for a, b in state.get("run", [])]


class CollapseDetector:
    """Raises :class:`CollapseError` when the teacher's entropy stays near its maximum ln K.

    ``teacher_entropy_ratio`` is H(teacher probabilities) / ln K, averaged over the batch (1.0 = uniform over the
    K prototypes). A ratio >= ``ratio_threshold`` for ``window_steps`` consecutive steps means the targets carry no
    information any more.
    """

    def __init__(self, ratio_threshold: float = 0.95, window_steps: int = 20) -> None:
        if not 0.0 < ratio_threshold <= 1.0:
            raise ValueError(f"CollapseDetector ratio_threshold must be in (0, 1], got {ratio_threshold}")
        if window_steps < 1:
            raise ValueError(f"CollapseDetector window_steps must be >= 1, got {window_steps}")
        self.ratio_threshold = ratio_threshold
        self.window_steps = window_steps
        self.consecutive = 0
        self.first_step: int | None = None

    def update(self, teacher_entropy_ratio: float, *, step: int) -> None:
        ratio = float(teacher_entropy_ratio)
        if not ratio >= self.ratio_threshold:  # also resets on NaN: FiniteGuard reports those
            self.consecutive = 0
            self.first_step = None
            return
        if self.consecutive == 0:
            self.first_step = step
        self.consecutive += 1
        if self.consecutive >= self.window_steps:
            raise CollapseError(
                f"teacher collapse: the teacher output is near uniform, entropy >= {self.ratio_threshold:g} * ln K "
                f"for {self.consecutive} consecutive steps (steps {self.first_step}..{step}, last H/lnK = "
                f"{ratio:.4f}). The teacher targets no longer carry information, so training cannot recover. "
                "Check: the teacher temperature (too high flattens the targets; DINO uses 0.04-0.07 with warmup), "
                "the centering momentum (centering without enough sharpening drives outputs uniform; 0.9 is usual), "
                "BatchNorm in the projection head (DINO heads for ViT use none), and the learning rate / warmup "
                "(too high an lr early destroys the features)."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "first_step": self.first_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.consecutive = int(state["consecutive"])
        self.first_step = None if state["first_step"] is None else int(state["first_step"])
