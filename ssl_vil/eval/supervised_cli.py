"""The command line every supervised run shares (``eval/finetune.py``, ``eval/segment.py``): the same options,
the same one-line errors, and the same report when a signal or the step guard stopped the run.

``--config RECIPE --output-dir OUT [--weights W] [--no-resume] [key.sub=value ...]``; re-running the same command
resumes from ``OUT``'s newest valid checkpoint. SIGUSR2 / SIGTERM (preemption) and Ctrl-C save at the next step
boundary and exit with ``REQUEUE_EXIT_CODE`` (75, which the cluster launcher requeues) / ``INTERRUPT_EXIT_CODE``
(130); non-finite losses or gradients past ``guards.max_consecutive_skips`` (or any, with
``guards.nonfinite_policy=halt``) stop with ``GUARD_EXIT_CODE`` (:mod:`ssl_vil.infra.exit_codes`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from typing import Any

from ssl_vil.infra.cli_errors import HelpFormatter, add_version
from ssl_vil.infra.exit_codes import GUARD_EXIT_CODE, INTERRUPT_EXIT_CODE


def build_parser(prog: str, description: str, *, recipes: str, outputs: str, weights_help: str,
                 override_example: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_version(p)
    p.add_argument("--config", required=True, help=f"recipe ({recipes})")
    p.add_argument("--output-dir", required=True, help=outputs)
    p.add_argument("--weights", default=None, help=weights_help)
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --output-dir")
    p.add_argument("overrides", nargs="*", help=f"recipe overrides key.sub=value (e.g. {override_example})")
    return p


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The command line's ``key=value`` overrides, ``--weights W`` as ``model.weights=W``."""
    return list(args.overrides) + ([f"model.weights={args.weights}"] if args.weights else [])


def train(prog: str, task: str, run: Callable[[], dict[str, Any] | int], argv: list[str] | None
          ) -> dict[str, Any] | int:
    """``run()`` the task; its results, or the exit code of an early stop, reported on stderr in one line:
    ``GUARD_EXIT_CODE`` when the step guard halted ``task``, or the requeue / interrupt code with the command that
    resumes the run."""
    from ssl_vil.train.guards import NonFiniteError

    try:
        result = run()
    except NonFiniteError as e:
        print(f"{prog}: {task} stopped: {e}", file=sys.stderr, flush=True)
        return GUARD_EXIT_CODE
    if isinstance(result, int):
        why = "interrupted" if result == INTERRUPT_EXIT_CODE else "preempted"
        command = shlex.join(["python", prog, *(sys.argv[1:] if argv is None else argv)])
        print(f"{why}: checkpoint saved; resume with: {command}", file=sys.stderr, flush=True)
    return result


def exit_with(result: dict[str, Any] | int) -> None:
    """The process exit status of a CLI's ``main``: its code, or 0 when the run completed."""
    sys.exit(result if isinstance(result, int) else 0)
