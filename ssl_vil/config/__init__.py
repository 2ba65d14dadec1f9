"""Typed run configuration: schema, loading with did-you-mean errors, derived values."""

from ssl_vil.config.errors import ConfigError
from ssl_vil.config.load import diff_configs, load_config, parse_override, read_yaml, to_dict, to_yaml
from ssl_vil.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "diff_configs", "load_config", "parse_override", "read_yaml", "to_dict",
           "to_yaml"]
