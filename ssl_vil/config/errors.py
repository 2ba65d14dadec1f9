"""The one exception type every config problem raises."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration is invalid; the message names the dotted key, the bad value and what was expected.

    ``key`` is the dotted key relative to the config node that raised (empty when the message names no key);
    :meth:`within` re-roots it when the node sits inside a larger tree, so a component's own check reads
    ``objective.dino_head.out_dim: ...`` when it fires from a run config.
    """

    def __init__(self, message: str, *, key: str = "") -> None:
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)

    def within(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` prepended to its key (or naming ``prefix`` when it had none)."""
        if not prefix:
            return self
        key = f"{prefix}.{self.key}" if self.key else prefix
        err = type(self)(self.detail, key=key)
        err.__cause__ = self.__cause__
        return err


def invalid(key: str, value: Any, expected: str) -> ConfigError:
    """``key: got <value>, expected <expected>``."""
    return ConfigError(f"got {value!r}, expected {expected}", key=key)
