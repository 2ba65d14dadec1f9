"""One config engine for every typed dataclass tree: ``defaults <- YAML <- key.sub=value overrides``.

A config tree is a dataclass whose fields are scalars, lists / tuples / mappings of scalars, ``Literal`` choices
and nested config dataclasses (optionally ``None``). The engine builds it from nested dicts, checking every value
against its annotation (coercing int -> float and list -> tuple), rejecting unknown keys with a did-you-mean over
the whole tree, and runs each node's own checks. A node subclasses :class:`Config` and states its checks in
:meth:`Config.validate` with keys relative to itself; the engine re-roots them, so a component's check reads
``objective.dino_head.out_dim: got 0, expected ...`` when it fires from a run config, and ``out_dim: ...`` when the
component is built directly in Python.

Used by the pretraining run config (:mod:`ssl_vil.config.load`), the fine-tuning config
(:mod:`ssl_vil.eval.finetune_config`) and the k-NN / linear evaluation CLIs (their ``--flag value`` arguments,
parsed by argparse, are the keys: ``--train-data X`` is ``train_data``; see :func:`from_flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from ssl_vil.config.errors import ConfigError, invalid

T = TypeVar("T")


class Config:
    """Base of a config node: on construction every field is checked against its annotation, then
    :meth:`validate` runs. Subclasses are ``@dataclass(kw_only=True, slots=True)``."""

    __slots__ = ()

    def __post_init__(self) -> None:
        coerce_fields(self)
        self.validate()

    def validate(self) -> None:
        """Checks across this node's fields; raise :class:`ConfigError` with keys relative to this node."""


# ----------------------------------------------------------------------------------------------- annotations
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _node_class(tp: Any) -> tuple[type | None, bool]:
    """(config dataclass, None allowed) for ``C`` or ``C | None``; (None, False) for any other annotation."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp, False
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]) and len(get_args(tp)) == 2:
            return args[0], True
    return None, False


def type_name(tp: Any) -> str:
    """What a value of annotation ``tp`` must look like, for error messages."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {type_name(args[0])}"
        return f"a list of {type_name(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "bool (true/false)"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise invalid(key, value, type_name(tp))
    if origin is Literal:
        choices = get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"got {value!r}, expected {type_name(tp)}{hint}", key=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise invalid(key, value, type_name(tp))
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise invalid(key, list(value), type_name(tp))
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        items = [coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise invalid(key, value, "a mapping")
        value_type = get_args(tp)[1] if get_args(tp) else Any
        return {str(k): coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise invalid(key, value, type_name(bool))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise invalid(key, value, "int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                raise invalid(key, value, "float") from None
            if math.isfinite(number):
                return number
        raise invalid(key, value, "float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise invalid(key, value, "str")
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")  # a schema bug, not user input


def coerce_fields(node: Any) -> None:
    """Check (and convert in place) every field of the dataclass instance ``node`` against its annotation."""
    hints = _hints(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        tp = hints[f.name]
        node_cls, optional = _node_class(tp)
        if node_cls is not None:
            if not (isinstance(value, node_cls) or (optional and value is None)):
                raise invalid(f.name, value, f"a {node_cls.__name__}" + (" or null" if optional else ""))
            continue
        converted = coerce(value, tp, f.name)
        if converted is not value:
            object.__setattr__(node, f.name, converted)


# ------------------------------------------------------------------------------------------------ the tree
@functools.cache
def all_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of the config tree rooted at ``cls`` (sections and leaves)."""
    out: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        out.append(dotted)
        node_cls, _ = _node_class(hints[f.name])
        if node_cls is not None:
            out.extend(all_keys(node_cls, dotted + "."))
    return tuple(out)


def _unknown_key(key: str, here: type, root: type, moved: Mapping[str, str], internal: tuple[str, ...]
                 ) -> ConfigError:
    """``key: unknown key; did you mean ...?`` with suggestions from the whole tree, not only the section."""
    if key in moved:
        return ConfigError(f"unknown key; {moved[key]}", key=key)
    parent, _, leaf = key.rpartition(".")
    siblings = [f.name for f in dataclasses.fields(here)]
    everywhere = [k for k in all_keys(root) if not any(k == p or k.startswith(p + ".") for p in internal)]
    same_leaf = [k for k in everywhere if k.rpartition(".")[2] == leaf and k != key]
    near_sibling = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    suggestion: str | None = None
    if same_leaf:
        suggestion = " or ".join(same_leaf[:2])
    elif near_sibling:
        suggestion = f"{parent}.{near_sibling[0]}" if parent else near_sibling[0]
    else:
        leaves = {k.rpartition(".")[2]: k for k in reversed(everywhere)}
        near_leaf = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
        near_key = difflib.get_close_matches(key, everywhere, n=1, cutoff=0.75)
        suggestion = near_key[0] if near_key else leaves[near_leaf[0]] if near_leaf else None
    if suggestion:
        return ConfigError(f"unknown key; did you mean {suggestion}?", key=key)
    where = f"{parent}." if parent else ""
    return ConfigError(f"unknown key; valid keys here: {', '.join(where + s for s in siblings)}", key=key)


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def build(cls: type[T], data: Mapping[str, Any] | None, *, moved: Mapping[str, str] | None = None,
          internal: Iterable[str] = (), _prefix: str = "", _root: type | None = None) -> T:
    """Instantiate the config dataclass ``cls`` from nested ``data`` over its defaults.

    Unknown keys, wrong types and failed node checks raise :class:`ConfigError` with the full dotted key.
    ``moved`` maps dotted keys that no longer exist to a note (``"moved to masking.mode"``) shown instead of a
    did-you-mean; keys under the ``internal`` prefixes (resolved values, never set by hand) are never suggested.
    """
    root = _root or cls
    key = _prefix.rstrip(".")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise invalid(key or "<root>", data, "a mapping")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in data:
        if name not in names:
            raise _unknown_key(f"{_prefix}{name}", cls, root, moved or {}, tuple(internal))
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ConfigError(f"missing; expected {type_name(hints[f.name])}", key=f"{_prefix}{f.name}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        node_cls, optional = _node_class(tp)
        if node_cls is None:
            kwargs[name] = coerce(value, tp, f"{_prefix}{name}")
        elif value is None and optional:
            kwargs[name] = None
        else:
            if value is not None and not isinstance(value, Mapping):
                raise invalid(f"{_prefix}{name}", value, "a mapping")
            default = _field_default(cls, name)
            base = to_dict(default) if dataclasses.is_dataclass(default) else {}
            kwargs[name] = build(node_cls, merge(base, dict(value or {})), moved=moved, internal=internal,
                                 _prefix=f"{_prefix}{name}.", _root=root)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.within(key) from None


# ----------------------------------------------------------------------------------------------- dicts, YAML
def to_dict(cfg: Any) -> Any:
    """Nested plain dict (tuples become lists) of a config dataclass."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(x) for x in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, recursively for nested mappings."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001); the value is parsed as a YAML scalar or list."""
    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {raw!r}: {e}", key=key.strip()) from None
    return key.strip().split("."), value


def overrides_to_dict(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "a.c=x"]`` -> ``{"a": {"b": 1, "c": "x"}}``."""
    out: dict[str, Any] = {}
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"conflicts with an earlier override of {p}", key=".".join(path))
            node = nxt
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r}: not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at top level, got {type(data).__name__}")
    return data


def to_yaml(cfg: Any) -> str:
    """The config tree as YAML, in field order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def load(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), *,
         drop: Iterable[str] = (), moved: Mapping[str, str] | None = None,
         prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> T:
    """``cls`` defaults <- YAML file at ``path`` <- ``key.sub=value`` overrides, built and validated.

    Top-level keys in ``drop`` are removed from the merged input first (e.g. a resolved ``derived`` section,
    recomputed by the caller) and never suggested for a misspelt key. ``prepare`` rewrites the file's mapping
    before the overrides apply (e.g. a config recorded by an earlier version, upgraded).
    """
    drop = tuple(drop)
    data = read_yaml(path) if path is not None else {}
    if prepare is not None:
        data = prepare(data)
    over = overrides_to_dict(overrides)
    data = merge(_without_replaced_units(data, over), over)
    for key in drop:
        data.pop(key, None)
    return build(cls, data, moved=moved, internal=drop)


DURATION_UNITS = ("steps", "samples", "epochs")


def _without_replaced_units(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` less the durations an override restates in another unit.

    A duration is set in exactly one unit (``warmup_steps`` | ``warmup_samples`` | ``warmup_epochs``); a recipe
    stating ``total_epochs: 100`` overridden with ``schedule.total_steps=50`` means 50 steps, so the recipe's
    ``total_epochs`` is dropped rather than reported as a second unit. Both units given as overrides still fail.
    """
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _without_replaced_units(out[key], value)
            continue
        stem, _, unit = key.rpartition("_")
        if stem and unit in DURATION_UNITS and value is not None:
            for other in DURATION_UNITS:
                if other != unit and f"{stem}_{other}" not in over:
                    out.pop(f"{stem}_{other}", None)
    return out


def from_flags(cls: type[T], flags: argparse.Namespace) -> T:
    """The config ``cls`` from parsed command-line flags: ``--train-data X`` is the key ``train_data``."""
    return build(cls, vars(flags))


def parse_flags(cls: type[T], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> T:
    """``argv`` parsed by ``parser`` as a checked ``cls``; a bad value exits 2 with the key and what was expected."""
    try:
        return from_flags(cls, parser.parse_args(argv))
    except ConfigError as err:
        parser.error(str(err))


def describe_diff(diffs: Iterable[tuple[str, Any, Any]]) -> str:
    """``"optim.lr: run has 0.003, now 0.001; ..."`` for the differences :func:`diff` found (recorded, current)."""
    return "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, a, b in diffs)


def diff(a: Any, b: Any, *, ignore_prefixes: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two config trees, skipping ``ignore_prefixes``."""
    ignore = tuple(ignore_prefixes)
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys())
            if fa.get(k) != fb.get(k) and not any(k == p or k.startswith(p) for p in ignore)]
