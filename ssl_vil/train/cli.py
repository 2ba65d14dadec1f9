"""Pretraining entry point: ``python -m ssl_vil.train --config recipes/X.yaml --output-dir RUN [key=value ...]``.

The same command runs on one process, under ``torchrun`` and under the Slurm launcher (``cluster/submit.py``).
An existing run dir resumes automatically from its newest valid checkpoint.

Exit codes: 0 done; 2 refused to start, with one ``config error:`` / ``error:`` line on stderr and the run dir left
as it was (bad config or overrides, an output path that cannot be a directory, ``train.device=cuda`` without CUDA,
unusable data, a config that differs from the run's record in keys that may not change on resume, no usable
checkpoint, the run dir locked by another trainer); 3 stopped by a guard; 75 saved for a requeue after a
preemption signal (SIGUSR2 / SIGTERM); 130 stopped by Ctrl-C, after saving at the step boundary (a second Ctrl-C
exits at once without saving). A run stopped by a signal ends with one ``resume with:`` line giving the command.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors
from ssl_vil.infra.exit_codes import GUARD_EXIT_CODE, INTERRUPT_EXIT_CODE, REFUSED_EXIT_CODE, REQUEUE_EXIT_CODE

PROG = "python -m ssl_vil.train"

__all__ = ["GUARD_EXIT_CODE", "INTERRUPT_EXIT_CODE", "REFUSED_EXIT_CODE", "REQUEUE_EXIT_CODE", "build_parser",
           "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_version(ap)
    ap.add_argument("--config", required=True, type=Path, help="recipe YAML (e.g. recipes/demo_digits.yaml)")
    ap.add_argument("--output-dir", required=True, type=Path, help="run directory (resumed if it exists)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return ap


def _one_line_on_interrupt(entry: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Ctrl-C outside the training loop (start-up, shutdown), where no save is due: one line and 130, no traceback.
    Inside the loop the trainer's handler takes SIGINT and no KeyboardInterrupt is raised."""
    @functools.wraps(entry)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return entry(argv)
        except KeyboardInterrupt:
            print("interrupted outside the training loop: exiting without saving", file=sys.stderr, flush=True)
            return INTERRUPT_EXIT_CODE
    return wrapper


def _announce_resume(code: int, argv: list[str] | None, is_main: bool) -> int:
    """After a save for a signal (preemption or Ctrl-C), rank 0 ends with the command that continues the run."""
    if code in (REQUEUE_EXIT_CODE, INTERRUPT_EXIT_CODE) and is_main:
        why = "interrupted" if code == INTERRUPT_EXIT_CODE else "preempted"
        command = shlex.join(["python", "-m", "ssl_vil.train", *(sys.argv[1:] if argv is None else argv)])
        print(f"{why}: checkpoint saved; resume with: {command}", file=sys.stderr, flush=True)
    return code


@user_errors(PROG)
@_one_line_on_interrupt
def main(argv: list[str] | None = None) -> int:
    """Parse, validate the config (before any process group), then train. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    from ssl_vil.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ssl_vil.train.run_dir import RunDirError, check_output_dir, check_resume_compatible

    # Everything that can be checked without side effects is checked before any process group exists and
    # before the output dir is touched.
    try:
        cfg = load_config(args.config, args.overrides)
        check_output_dir(args.output_dir)
        _check_device(cfg.train.device)
        check_resume_compatible(args.output_dir, cfg)
    except ConfigError as e:
        return _refuse(f"config error: {e}")
    except RunDirError as e:
        return _refuse(f"error: {e}")

    from ssl_vil.data.errors import DataErrorBudgetExceeded
    from ssl_vil.infra.dist import init_distributed, shutdown
    from ssl_vil.train.guards import CollapseError, NonFiniteError
    from ssl_vil.train.loop import run

    info = init_distributed(device=cfg.train.device, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    try:
        return _announce_resume(run(cfg, args.output_dir, info), argv, info.is_main)
    except ConfigError as e:  # e.g. too few shards for ranks × workers, found when the stream opens
        return _refuse(f"config error: {e}")
    except RunDirError as e:  # locked by another trainer, no usable checkpoint
        return _refuse(f"error: {e}")
    except (NonFiniteError, CollapseError, DataErrorBudgetExceeded) as e:
        print(f"training stopped on rank {info.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return GUARD_EXIT_CODE
    finally:
        shutdown()


def _refuse(message: str) -> int:
    print(message, file=sys.stderr, flush=True)
    return REFUSED_EXIT_CODE


def _check_device(requested: str) -> None:
    from ssl_vil.config import ConfigError

    if requested == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("got 'cuda', but CUDA is not available on this machine; expected 'auto' or 'cpu'",
                              key="train.device")
