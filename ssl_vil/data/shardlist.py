"""Turning a shard specification into an ordered list of URLs with their record counts.

Accepted specifications (``resolve_shards``):

- a directory: the shards its ``manifest-<split>.json`` lists (``split`` may be omitted when there is one
  manifest); without a manifest, its ``*.tar`` files (``*-<split>-*.tar`` when ``split`` is given), sorted;
- a glob (``/data/in1k/train-*.tar``), sorted;
- a brace / ``::`` / ``${VAR}`` URL string as webdataset expands it (``/d/train-{000000..000099}.tar``);
- a list of any of these.

``pipe:`` URLs run a shell command per shard and are refused unless ``allow_pipe=True``.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.shardlists import expand_urls

from ssl_vil.data.errors import DataConfigError
from ssl_vil.data.manifest import list_splits, read_manifest, sidecar_classes, sidecar_counts
from ssl_vil.data.tar_records import ShardRecordReader, is_local, local_path

logger = logging.getLogger("ssl_vil.data")

ShardSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def _check_pipe(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise DataConfigError(
            f"refusing shard URL {url!r}: pipe: URLs run shell commands; pass allow_pipe=True if the source is trusted"
        )


def _resolve_one(spec: str, split: str | None, allow_pipe: bool) -> list[str]:
    if os.path.isdir(spec):
        directory = Path(spec)
        if split is not None and (directory / f"manifest-{split}.json").exists():
            return read_manifest(directory, split).urls
        if split is None and len(list_splits(directory)) == 1:
            return read_manifest(directory).urls
        if split is None and len(list_splits(directory)) > 1:
            raise DataConfigError(f"{directory} holds several splits {list_splits(directory)}; pass split=...")
        pattern = f"*-{split}-*.tar" if split is not None else "*.tar"
        found = sorted(str(p) for p in directory.glob(pattern))
        if not found:
            raise DataConfigError(f"{directory}: no shards matching {pattern!r} and no manifest")
        return found
    if not spec.startswith("pipe:") and any(ch in spec for ch in "*?[") and "://" not in spec:
        found = sorted(glob.glob(spec))
        if not found:
            raise DataConfigError(f"shard glob {spec!r} matches no file")
        return found
    urls = expand_urls(spec)
    for url in urls:
        _check_pipe(url, allow_pipe)
    return urls


def resolve_shards(
    spec: ShardSpec, *, split: str | None = None, allow_pipe: bool = False
) -> list[str]:
    """Ordered shard URLs of ``spec`` (see the module docstring); local files must exist."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        urls.extend(_resolve_one(os.fspath(item), split, allow_pipe))
    if not urls:
        raise DataConfigError(f"shard specification {spec!r} resolves to no shard")
    missing = [u for u in urls if is_local(u) and not os.path.exists(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataConfigError(f"{len(missing)} shard file(s) do not exist: {missing[:5]}{more}")
    return urls


@dataclass(frozen=True, slots=True)
class ShardSet:
    """Ordered shard URLs, their record counts, and the class names of their labels (may be empty)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.urls) != len(self.counts):
            raise ValueError(f"{len(self.urls)} urls but {len(self.counts)} counts")

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def digest(self) -> str:
        """Identity of the data (shard basenames and counts, in order), independent of where it is mounted."""
        h = hashlib.sha256()
        for url, count in zip(self.urls, self.counts):
            h.update(f"{os.path.basename(url)}\t{count}\n".encode())
        return h.hexdigest()[:16]


def count_records(url: str) -> int:
    """Number of records in one shard, read from its headers; a damaged shard raises DataConfigError."""
    with ShardRecordReader(url, expected=None) as reader:
        count, issues = reader.count_all()
    shard_level = [i for i in issues if i.category in ("truncated_shard", "unreadable_shard")]
    if shard_level:
        raise DataConfigError(f"cannot count the records of {url}: {shard_level[0].describe()}")
    return count


def resolve_shard_set(
    spec: ShardSpec,
    *,
    split: str | None = None,
    allow_pipe: bool = False,
    shard_sizes: Mapping[str, int] | None = None,
) -> ShardSet:
    """URLs of ``spec`` with record counts from ``shard_sizes`` (basename or URL -> count), the sidecars next to
    the shards (manifest, ``sizes.json``, ``_info.json``), or, for local shards without any, a header scan."""
    urls = resolve_shards(spec, split=split, allow_pipe=allow_pipe)
    given = dict(shard_sizes or {})
    by_dir: dict[str, dict[str, int]] = {}
    counts: list[int] = []
    unsized: list[str] = []
    for url in urls:
        base = os.path.basename(url)
        if url in given or base in given:
            counts.append(int(given.get(url, given.get(base, 0))))
            continue
        if is_local(url):
            directory = os.path.dirname(os.path.abspath(local_path(url)))
            if directory not in by_dir:
                by_dir[directory] = sidecar_counts(Path(directory))
            if base in by_dir[directory]:
                counts.append(by_dir[directory][base])
                continue
            unsized.append(url)
            counts.append(-1)
        else:
            raise DataConfigError(
                f"no record count for remote shard {url}; pass shard_sizes={{basename: count}} "
                "(for example the sizes.json written next to the shards)"
            )
    if unsized:
        logger.warning("no sidecar lists %d local shard(s); counting their records from tar headers", len(unsized))
        scanned = {u: count_records(u) for u in unsized}
        counts = [scanned[u] if c < 0 else c for u, c in zip(urls, counts)]
    classes: list[str] = []
    local_dirs = {os.path.dirname(os.path.abspath(local_path(u))) for u in urls if is_local(u)}
    if len(local_dirs) == 1:
        classes = sidecar_classes(Path(local_dirs.pop()), {os.path.basename(u) for u in urls})
    return ShardSet(tuple(urls), tuple(counts), tuple(classes))
