"""What every command does with a mistake its user can make: one line on stderr and exit status 2, no traceback.

Each command's ``main`` is wrapped once::

    @user_errors("python -m ssl_vil.export")
    def main(argv=None) -> int: ...

A known user error escaping ``main`` (a bad config key or value, a refused data source, a weights file that is not
one, a damaged checkpoint, a run dir without metrics, a missing or unwritable user path...) is printed as
``<prog>: error: <message>`` and ends the process with
:data:`~ssl_vil.infra.exit_codes.REFUSED_EXIT_CODE`; Ctrl-C ends it with one line and 130. Anything else is a bug
and keeps its traceback. ``SSL_VIL_DEBUG=1`` re-raises user errors too, traceback included.

Also here: the ``--version`` option and the help formatter every command's parser uses. Nothing in this module
imports torch: the error classes are looked up only in modules already imported (an exception of a class whose
module was never imported cannot have been raised).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from ssl_vil.infra.exit_codes import INTERRUPT_EXIT_CODE, REFUSED_EXIT_CODE

DEBUG_ENV = "SSL_VIL_DEBUG"

# (module, class): the errors a user causes; every message names the file / key / sample and what was expected.
USER_ERRORS = (
    ("ssl_vil.config.errors", "ConfigError"),  # includes the data layer's DataConfigError
    ("ssl_vil.backbones.weights", "WeightLoadError"),
    ("ssl_vil.checkpoint.errors", "CheckpointError"),
    ("ssl_vil.report", "ReportError"),
    ("ssl_vil.train.run_dir", "RunDirError"),
    ("ssl_vil.data.errors", "DataError"),
)

# OS errors about a path the user gave; others (a full disk, an I/O error) keep their traceback.
USER_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _is_one_of(exc: BaseException, classes: tuple[tuple[str, str], ...]) -> bool:
    for module_name, class_name in classes:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def _os_error_message(exc: OSError) -> str:
    if exc.filename is None:
        return str(exc)
    what = exc.strerror or str(exc)
    if exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {what}"
    return f"{exc.filename}: {what}"


def user_error_message(exc: BaseException) -> str | None:
    """The message of an error the user caused, None for anything else (a bug)."""
    if _is_one_of(exc, USER_ERRORS):
        return str(exc)
    if isinstance(exc, USER_PATH_ERRORS):  # a user path that is missing, not a directory, not writable, ...
        return _os_error_message(exc)
    return None


def user_errors(prog: str) -> Callable[[F], F]:
    """Decorate a command's ``main``: a user error becomes one line ``<prog>: ...`` and ``SystemExit(2)``."""
    def decorate(main: F) -> F:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                if debug_enabled():
                    raise
                print(f"{prog}: interrupted", file=sys.stderr, flush=True)
                raise SystemExit(INTERRUPT_EXIT_CODE) from None
            except Exception as exc:
                message = user_error_message(exc)
                if message is None or debug_enabled():
                    raise
                print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
                raise SystemExit(REFUSED_EXIT_CODE) from None
        return wrapper  # type: ignore[return-value]
    return decorate


def version_string() -> str:
    from ssl_vil import __version__

    return f"ssl_vil {__version__}"


def add_version(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--version``: prints ``ssl_vil <version>`` and exits 0."""
    parser.add_argument("--version", action="version", version=version_string())
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless its help already says it) and keeps the description's line breaks."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return bool(action.option_strings) and action.help != argparse.SUPPRESS and not (
            action.default is None or action.default is False or action.default is argparse.SUPPRESS
            or action.default == [])

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):
            action.help = "(default: %(default)s)"  # an option without help text still shows its default
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if not self._shows_default(action) or "default" in help_text.lower():
            return action.help
        return f"{help_text} (default: %(default)s)"
