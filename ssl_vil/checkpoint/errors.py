"""Exceptions raised by the checkpoint component; all derive from :class:`CheckpointError`."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """Base class: a checkpoint could not be written, verified or loaded."""


class CheckpointWriteError(CheckpointError):
    """A save failed; the temp folder was removed and the previous checkpoint is untouched.

    When the cause is a full disk (``ENOSPC``) the message contains ``"no space"``.
    """


class CheckpointVerificationError(CheckpointError):
    """A step folder does not match its manifest (missing, truncated or altered file; bad manifest)."""


class CheckpointLoadError(CheckpointError):
    """A step folder matches its manifest but a file in it cannot be unpickled (``weights_only=True``)."""
