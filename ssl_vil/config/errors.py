"""The one exception type every config problem raises."""


class ConfigError(ValueError):
    """A run configuration is invalid; the message names the dotted key, the bad value and what was expected."""
