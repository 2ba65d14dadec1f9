"""Which step folders survive a save: the ``keep_last`` newest valid ones plus multiples of ``keep_every_steps``."""

from __future__ import annotations

from collections.abc import Callable, Iterable


def plan_retention(
    steps: Iterable[int],
    *,
    current_step: int,
    keep_last: int,
    keep_every_steps: int | None,
    is_valid: Callable[[int], bool],
) -> dict[int, str]:
    """Steps to delete, each with the reason, after ``current_step`` was saved and verified.

    - The ``keep_last`` newest *valid* steps stay; ``is_valid`` is asked newest-first and only until that
      many are found, so older folders are never read. ``current_step`` is the newest, so the previous
      newest valid folder goes only once its successor is verified.
    - Multiples of ``keep_every_steps`` stay unconditionally and unverified (they are the permanent record).
    - Folders with a step above ``current_step`` are deleted: the run resumed from an older step, so they
      belong to an abandoned timeline and, left in place, would win the "newest verified" resume rule.
    - Everything else (older, or failing verification) is deleted.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed: dict[int, str] = {}
    valid_seen = 0
    for step in sorted(set(steps), reverse=True):
        if step > current_step:
            doomed[step] = f"newer than the step just saved ({current_step}); left by an abandoned run timeline"
            continue
        permanent = keep_every_steps is not None and step % keep_every_steps == 0
        if valid_seen < keep_last:
            if is_valid(step):
                valid_seen += 1
                continue
            if not permanent:
                doomed[step] = "fails verification"
                continue
        if not permanent:
            doomed[step] = f"older than the newest {keep_last} valid checkpoints"
    return doomed
