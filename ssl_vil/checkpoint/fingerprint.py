"""Stable fingerprint of a resolved configuration, stored in every checkpoint manifest."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any


def _canonical(value: Any, where: str) -> Any:
    """Check that ``value`` is plain JSON data and return it with tuples turned into lists.

    Only str keys and None / bool / int / finite float / str / list / tuple / dict values are accepted, so
    the hash never depends on ``repr`` of an arbitrary object (which may contain a memory address).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"config_hash: {where} is {value!r}; only finite floats can be hashed")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"config_hash: key {key!r} under {where} is {type(key).__name__}; keys must be str")
            out[key] = _canonical(item, f"{where}.{key}" if where != "<root>" else key)
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"config_hash: {where} is a {type(value).__name__} ({value!r}); a resolved config holds only "
        "None, bool, int, float, str, lists and dicts"
    )


def config_hash(resolved_config: Mapping[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of ``resolved_config`` (keys sorted, no whitespace, UTF-8).

    Key order does not matter; ``1`` and ``1.0`` hash differently, and tuples hash like lists.
    """
    canonical = _canonical(resolved_config, "<root>")
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
