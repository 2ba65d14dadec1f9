"""Shard sidecars: our manifest, timm's ``_info.json``, open_clip's ``sizes.json`` / ``__len__``.

One directory may hold several splits (``<name>-train-000000.tar``, ``<name>-val-000000.tar``...). Each split has
its own manifest ``manifest-<split>.json``::

    {"format": "ssl_vil.shards/1", "name": "digits", "split": "train", "num_samples": 1297,
     "classes": ["0", ..., "9"],
     "shards": [{"file": "digits-train-000000.tar", "num_samples": 1000, "sha256": "...", "bytes": 1234}, ...],
     "source": "builtin:digits", "plan_digest": "...", "options": {...}}

``num_samples`` counts tar *records* (see :mod:`ssl_vil.data.tar_records`). The other sidecars describe every
split in the directory: ``_info.json`` = ``{"name", "splits": {split: {"name", "num_samples", "filenames",
"shard_lengths"}}}`` (what ``timm.data.create_dataset('wds/<name>', root=dir, split=...)`` reads),
``sizes.json`` = ``{shard file: num_samples}`` and ``__len__`` = the total of ``sizes.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_vil.data.errors import DataConfigError
from ssl_vil.infra.files import write_bytes_atomic

MANIFEST_FORMAT = "ssl_vil.shards/1"
TIMM_INFO = "_info.json"
SIZES = "sizes.json"
LENGTH = "__len__"


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One shard file of a split: its basename, record count and (when written by us) sha256 and size."""

    file: str
    num_samples: int
    sha256: str | None = None
    bytes: int | None = None


@dataclass(slots=True)
class Manifest:
    """The shards of one split, in order, with the class names their ``.cls`` labels index."""

    root: Path
    name: str
    split: str
    shards: list[ShardInfo]
    classes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def urls(self) -> list[str]:
        return [str(self.root / s.file) for s in self.shards]

    @property
    def counts(self) -> list[int]:
        return [s.num_samples for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "split": self.split,
            "num_samples": self.num_samples,
            "classes": list(self.classes),
            "shards": [
                {"file": s.file, "num_samples": s.num_samples, "sha256": s.sha256, "bytes": s.bytes}
                for s in self.shards
            ],
            **self.extra,
        }


def manifest_path(root: str | os.PathLike[str], split: str) -> Path:
    return Path(root) / f"manifest-{split}.json"


def list_splits(root: str | os.PathLike[str]) -> list[str]:
    """Splits that have a manifest in ``root``."""
    return sorted(p.name[len("manifest-") : -len(".json")] for p in Path(root).glob("manifest-*.json"))


def read_manifest(root: str | os.PathLike[str], split: str | None = None) -> Manifest:
    """The manifest of ``split`` in directory ``root`` (``split`` may be omitted when there is only one)."""
    directory = Path(root)
    if split is None:
        splits = list_splits(directory)
        if len(splits) != 1:
            found = ", ".join(splits) if splits else "none"
            raise DataConfigError(f"{directory}: pass split=...; manifests found for splits: {found}")
        split = splits[0]
    path = manifest_path(directory, split)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        splits = list_splits(directory)
        raise DataConfigError(f"{path}: no manifest for split {split!r} (splits here: {splits})") from exc
    except json.JSONDecodeError as exc:
        raise DataConfigError(f"{path}: manifest is not valid JSON ({exc})") from exc
    shards, classes = parse_manifest(data, source=str(path))
    known = {"format", "name", "split", "num_samples", "classes", "shards"}
    return Manifest(
        root=directory,
        name=data["name"],
        split=data["split"],
        shards=shards,
        classes=classes,
        extra={k: v for k, v in data.items() if k not in known},
    )


def parse_manifest(data: Any, *, source: str) -> tuple[list[ShardInfo], list[str]]:
    """(shards, class names) of a manifest's parsed JSON; ``source`` (path or URL) names it in errors."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DataConfigError(f"{source}: format {found!r}, expected {MANIFEST_FORMAT!r}")
    try:
        shards = [
            ShardInfo(s["file"], int(s["num_samples"]), s.get("sha256"), s.get("bytes")) for s in data["shards"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataConfigError(f"{source}: manifest 'shards' is not a list of {{file, num_samples}} ({exc!r})") from exc
    return shards, [str(c) for c in data.get("classes", [])]


def sidecar_json_counts(data: Any, *, source: str) -> dict[str, int]:
    """Shard basename -> record count from the parsed JSON of any one sidecar: a manifest, ``_info.json`` or
    ``sizes.json``; ``source`` names it in errors."""
    try:
        if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT:
            return {s.file: s.num_samples for s in parse_manifest(data, source=source)[0]}
        if isinstance(data, dict) and isinstance(data.get("splits"), dict):
            counts: dict[str, int] = {}
            for split in data["splits"].values():
                counts.update(zip(split.get("filenames", []), (int(n) for n in split.get("shard_lengths", []))))
            return counts
        if isinstance(data, dict):
            return {str(k): int(v) for k, v in data.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise DataConfigError(f"{source}: not a shard sidecar ({exc!r})") from exc
    raise DataConfigError(f"{source}: not a shard sidecar: expected a manifest, _info.json or sizes.json "
                          f"({{shard file: record count}}), got a JSON {type(data).__name__}")


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8")


@contextlib.contextmanager
def _sidecar_lock(root: Path) -> Iterator[None]:
    # Two splits finishing at once both merge into _info.json / sizes.json; serialise the read-modify-write.
    with open(root / ".sidecars.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def write_manifest(manifest: Manifest) -> None:
    """Write ``manifest-<split>.json`` and merge the split into ``_info.json``, ``sizes.json`` and ``__len__``.

    The manifest is written last: it marks the split as complete.
    """
    root = manifest.root
    with _sidecar_lock(root):
        info = _read_json(root / TIMM_INFO, {})
        info["name"] = manifest.name
        info.setdefault("splits", {})[manifest.split] = {
            "name": manifest.split,
            "num_samples": manifest.num_samples,
            "filenames": [s.file for s in manifest.shards],
            "shard_lengths": manifest.counts,
        }
        write_bytes_atomic(root / TIMM_INFO, _dump(info))
        sizes = _read_json(root / SIZES, {})
        sizes.update({s.file: s.num_samples for s in manifest.shards})
        write_bytes_atomic(root / SIZES, _dump(sizes))
        write_bytes_atomic(root / LENGTH, f"{sum(sizes.values())}\n".encode())
        write_bytes_atomic(manifest_path(root, manifest.split), _dump(manifest.to_json()))


def sidecar_counts(directory: Path) -> dict[str, int]:
    """Shard basename -> record count from any sidecar in ``directory`` (manifests, sizes.json, _info.json)."""
    counts: dict[str, int] = {}
    info = _read_json(directory / TIMM_INFO, {})
    for split in info.get("splits", {}).values():
        counts.update(zip(split.get("filenames", []), split.get("shard_lengths", [])))
    counts.update({k: int(v) for k, v in _read_json(directory / SIZES, {}).items()})
    for split in list_splits(directory):
        try:
            manifest = read_manifest(directory, split)
        except DataConfigError:
            continue
        counts.update({s.file: s.num_samples for s in manifest.shards})
    return counts


def sidecar_classes(directory: Path, files: set[str]) -> list[str]:
    """Class names of the manifest whose shards include ``files`` (empty when no manifest lists them)."""
    for split in list_splits(directory):
        try:
            manifest = read_manifest(directory, split)
        except DataConfigError:
            continue
        if files & {s.file for s in manifest.shards}:
            return manifest.classes
    return []


def _named_only(classes: Sequence[str], other: Sequence[str]) -> list[str]:
    present = set(other)
    return [c for c in classes if c not in present]


def _short(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def class_label_map(
    reference: Sequence[str], other: Sequence[str], *, reference_source: str, other_source: str
) -> list[int] | None:
    """How the labels of ``other`` become indices of ``reference``, matched by class name: ``new = map[old]``.

    ``reference`` is the class list of the train / memory-bank data (the one index of the dataset) and ``other``
    that of the val / query data. Returns None when the labels are already right: the same names in the same
    order, or no names on either side (integer labels are then taken as they are). A val split that lacks some
    train classes is remapped. Raises :class:`DataConfigError` naming both sources when ``other`` has a class
    that ``reference`` lacks, when only one side names its classes, or when a list repeats a name.
    """
    reference, other = list(reference), list(other)
    for names, source in ((reference, reference_source), (other, other_source)):
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DataConfigError(f"{source}: class names repeat ({_short(repeated)}); labels cannot be matched "
                                  "by name")
    if reference == other:
        return None
    if not reference or not other:
        named, unnamed = (reference_source, other_source) if reference else (other_source, reference_source)
        count = len(reference or other)
        raise DataConfigError(
            f"{named} names its {count} classes but {unnamed} names none, so labels cannot be matched by class "
            f"name; give both the class list (ImageFolder sub-directories, or shards written by "
            f"python -m ssl_vil.data.make_shards, whose manifest lists 'classes')"
        )
    extra = _named_only(other, reference)
    if extra:
        raise DataConfigError(
            f"{other_source} has {len(extra)} class(es) that {reference_source} lacks: {_short(extra)}; "
            f"k-NN / linear / fine-tune evaluation can only score classes the train data has "
            f"(train classes: {_short(reference)})"
        )
    index = {name: i for i, name in enumerate(reference)}
    return [index[name] for name in other]
