"""Exit codes shared by the commands and the launchers (no torch: every command's ``--help`` imports this)."""

from __future__ import annotations

import signal

# Refused before any work: a user error (bad config, option, path or file), one line on stderr.
REFUSED_EXIT_CODE = 2
# A pretraining run stopped by a guard (non-finite values past the policy, a collapsed teacher, a blown data
# error budget).
GUARD_EXIT_CODE = 3
# The trainer saved for a requeue after a preemption signal; cluster/job.py requeues on this code only.
# EX_TEMPFAIL from sysexits.h ("temporary failure, the user is invited to retry"): distinct from Python's 1
# (uncaught exception) and 2 (usage), from torchrun's 1 and 128+signal codes, from `timeout`'s 124, and from the
# hang watchdog's 86.
REQUEUE_EXIT_CODE = 75
# Stopped by Ctrl-C (after saving at the step boundary inside the training loop): the conventional 128 + SIGINT,
# which no launcher requeues.
INTERRUPT_EXIT_CODE = 128 + int(signal.SIGINT)

__all__ = ["GUARD_EXIT_CODE", "INTERRUPT_EXIT_CODE", "REFUSED_EXIT_CODE", "REQUEUE_EXIT_CODE"]
