"""Turning a shard specification into an ordered list of URLs with their record counts.

Accepted specifications (``resolve_shards``):

- a directory: the shards its ``manifest-<split>.json`` lists (``split`` may be omitted when there is one
  manifest, or when ``prefer_split`` names one of several); without a manifest, its ``*.tar`` files
  (``*-<split>-*.tar`` when ``split`` is given), sorted;
- a glob (``/data/in1k/train-*.tar``), sorted;
- a brace / ``::`` / ``${VAR}`` URL string as webdataset expands it (``/d/train-{000000..000099}.tar``);
- a remote shard directory (``https://host/shards/``: any URL of a scheme webdataset's ``gopen`` reads that does
  not end in a tar suffix): the shards its ``manifest-<split>.json`` lists, the split chosen as for a local
  directory (the splits a server holds are listed by its ``_info.json``);
- a list of any of these.

Record counts come from ``shard_sizes``, the manifest, or the sidecars next to the shards (``sizes.json``,
``_info.json``, manifests), fetched through ``gopen`` for remote shards; local shards without any are counted
from their tar headers. ``pipe:`` URLs run a shell command per shard and are refused unless ``allow_pipe=True``;
they have no location to read sidecars from, so they need ``shard_sizes``.

Remote shards are read through ``webdataset.gopen`` (``curl`` for http(s), sftp, ftps and scp); a missing tool
is a :class:`DataConfigError` here rather than an unreadable shard per read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import webdataset as wds
from webdataset.gopen import gopen_schemes
from webdataset.shardlists import expand_urls

from ssl_vil.data.errors import DataConfigError
from ssl_vil.data.manifest import (
    SIZES,
    TIMM_INFO,
    list_splits,
    parse_manifest,
    read_manifest,
    sidecar_classes,
    sidecar_counts,
    sidecar_json_counts,
)
from ssl_vil.data.tar_records import ShardRecordReader, is_local, local_path

if TYPE_CHECKING:
    from ssl_vil.data.folder_records import FolderListing

logger = logging.getLogger("ssl_vil.data")

ShardSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

# The command webdataset's gopen runs for each remote scheme; without it every read of such a URL fails.
_GOPEN_TOOLS = {"http": "curl", "https": "curl", "sftp": "curl", "ftps": "curl", "scp": "curl", "htgs": "curl",
                "hf": "curl", "gs": "gsutil", "ais": "ais"}
# A remote URL ending in one of these names a shard; any other remote URL names a shard directory.
_SHARD_SUFFIX = re.compile(r"\.(tar|tgz|tar\.gz|tar\.bz2|tar\.xz|tar\.zst)$", re.IGNORECASE)


def _check_pipe(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise DataConfigError(
            f"refusing shard URL {url!r}: pipe: URLs run shell commands; pass allow_pipe=True if the source is trusted"
        )


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def is_remote(url: str) -> bool:
    """A URL read through gopen's scheme handlers (not a local path, ``file:`` URL or ``pipe:`` command)."""
    return not is_local(url) and not url.startswith("pipe:")


def _check_remote_reader(url: str) -> None:
    scheme = _scheme(url)
    if scheme not in gopen_schemes:
        readable = ", ".join(sorted(k for k in gopen_schemes if k not in ("__default__", "pipe")))
        raise DataConfigError(
            f"{url}: webdataset reads no {scheme}:// URL; expected a local path or one of {readable}:// (other "
            "stores can be read through a trusted pipe: URL with allow_pipe)", key="train")
    tool = _GOPEN_TOOLS.get(scheme)
    if tool is not None and shutil.which(tool) is None:
        raise DataConfigError(
            f"{url}: {scheme}:// shards are read by webdataset's gopen with the `{tool}` command, which is not on "
            f"PATH; install {tool}, or copy the shards to a local directory", key="train")


def _url_dir(url: str) -> str:
    """The URL of the directory holding ``url`` (with its trailing slash), query string dropped."""
    path = url.split("?", 1)[0]
    return path[: path.rfind("/") + 1]


def fetch_bytes(url: str) -> bytes:
    """The content at ``url`` (a local path or any URL gopen reads); OSError / ValueError when it cannot be read."""
    if is_local(url):
        with open(local_path(url), "rb") as handle:
            return handle.read()
    with wds.gopen(url, "rb") as stream:  # closing waits for the reader process and raises on its failure
        return stream.read()


def _fetch_json(url: str) -> tuple[Any, str | None]:
    """(parsed JSON at ``url``, None), or (None, why it could not be read)."""
    try:
        data = fetch_bytes(url)
    except (OSError, ValueError) as exc:
        exit_code = re.search(r"exit (\d+) \(read\)", str(exc))  # gopen's reader command failed
        if exit_code is None:
            return None, f"{type(exc).__name__}: {exc}"
        tool = _GOPEN_TOOLS.get(_scheme(url), "reader")
        hint = " (an HTTP error status such as 404)" if tool == "curl" and exit_code.group(1) == "22" else ""
        return None, f"{tool} exit {exit_code.group(1)}{hint}"
    try:
        return json.loads(data), None
    except ValueError as exc:  # an HTML error page served with status 200 lands here too
        return None, f"not JSON ({exc})"


def _remote_splits(base: str) -> list[str] | None:
    """Splits a remote shard directory lists in its ``_info.json``; None when there is none."""
    info, _ = _fetch_json(base + TIMM_INFO)
    if isinstance(info, dict) and isinstance(info.get("splits"), dict):
        return sorted(info["splits"])
    return None


def _remote_manifest(base: str, split: str | None, prefer_split: str | None) -> _Resolved:
    """Shards of the manifest of ``split`` (or the default split) in the remote directory ``base``."""
    chosen, tried = split, []
    if chosen is None and prefer_split is not None:
        data, why = _fetch_json(f"{base}manifest-{prefer_split}.json")
        if data is not None:
            chosen = prefer_split
        else:
            tried.append(f"manifest-{prefer_split}.json ({why})")
    if chosen is None:
        splits = _remote_splits(base)
        if splits is None:
            raise DataConfigError(
                f"{base}: a shard directory URL needs the sidecars python -m ssl_vil.data.make_shards writes next to "
                f"the shards: could not fetch {', '.join(tried + [TIMM_INFO])}; name the split (split) or list the "
                "shards as a brace URL (.../name-{000000..000099}.tar) with their sizes.json beside them",
                key="train")
        if len(splits) != 1:
            raise DataConfigError(f"{base} holds the splits {', '.join(splits)}; expected one of them named",
                                  key="split")
        chosen = splits[0]
    data, why = _fetch_json(f"{base}manifest-{chosen}.json")
    if data is None:
        splits = _remote_splits(base)
        listed = ", ".join(splits) if splits else "unknown (no _info.json)"
        raise DataConfigError(f"{base}: no manifest for split {chosen!r} (manifest-{chosen}.json: {why}); "
                              f"splits there: {listed}", key="split")
    shards, classes = parse_manifest(data, source=f"{base}manifest-{chosen}.json")
    urls = [base + s.file for s in shards]
    return _Resolved(urls, dict(zip(urls, (s.num_samples for s in shards))), classes)


@dataclass(slots=True)
class _Resolved:
    urls: list[str]
    counts: dict[str, int] = field(default_factory=dict)  # known from a remote manifest
    classes: list[str] = field(default_factory=list)


def _local_directory(directory: Path, split: str | None, prefer_split: str | None) -> list[str]:
    splits = list_splits(directory)
    chosen = split
    if chosen is None and len(splits) == 1:
        chosen = splits[0]
    elif chosen is None and len(splits) > 1:
        if prefer_split not in splits:
            raise DataConfigError(f"{directory} holds the splits {', '.join(splits)}; expected one of them named",
                                  key="split")
        chosen = prefer_split
    if chosen is not None and chosen in splits:
        return read_manifest(directory, chosen).urls
    pattern = f"*-{chosen}-*.tar" if chosen is not None else "*.tar"
    found = sorted(str(p) for p in directory.glob(pattern))
    if not found:
        if chosen is not None:
            listed = ", ".join(splits) if splits else "none"
            raise DataConfigError(f"{directory}: no manifest-{chosen}.json and no shard matching {pattern!r}; "
                                  f"splits with a manifest there: {listed}", key="split")
        raise DataConfigError(f"{directory}: no shards matching {pattern!r} and no manifest", key="train")
    return found


def _resolve_one(spec: str, split: str | None, allow_pipe: bool, prefer_split: str | None = None) -> _Resolved:
    if os.path.isdir(spec):
        return _Resolved(_local_directory(Path(spec), split, prefer_split))
    if not spec.startswith("pipe:") and any(ch in spec for ch in "*?[") and "://" not in spec:
        found = sorted(glob.glob(spec))
        if not found:
            raise DataConfigError(f"shard glob {spec!r} matches no file")
        return _Resolved(found)
    if is_remote(spec) and "{" not in spec and not _SHARD_SUFFIX.search(spec.split("?", 1)[0]):
        _check_remote_reader(spec)
        return _remote_manifest(spec.rstrip("/") + "/", split, prefer_split)
    urls = expand_urls(spec)
    for url in urls:
        _check_pipe(url, allow_pipe)
        if is_remote(url):
            _check_remote_reader(url)
    return _Resolved(urls)


def _resolve_all(
    spec: ShardSpec, split: str | None, allow_pipe: bool, prefer_split: str | None
) -> tuple[list[str], dict[str, int], list[str]]:
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    counts: dict[str, int] = {}
    classes: list[str] = []
    for item in items:
        resolved = _resolve_one(os.fspath(item), split, allow_pipe, prefer_split)
        urls.extend(resolved.urls)
        counts.update(resolved.counts)
        classes = classes or resolved.classes
    if not urls:
        raise DataConfigError(f"shard specification {spec!r} resolves to no shard")
    missing = [u for u in urls if is_local(u) and not os.path.exists(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataConfigError(f"{len(missing)} shard file(s) do not exist: {missing[:5]}{more}")
    return urls, counts, classes


def resolve_shards(
    spec: ShardSpec, *, split: str | None = None, allow_pipe: bool = False, prefer_split: str | None = None
) -> list[str]:
    """Ordered shard URLs of ``spec`` (see the module docstring); local files must exist."""
    return _resolve_all(spec, split, allow_pipe, prefer_split)[0]


@dataclass(frozen=True, slots=True)
class ShardSet:
    """Ordered shard URLs, their record counts, and the class names of their labels (may be empty).

    ``folder`` is set when the shards are the virtual chunks of an image folder
    (:mod:`ssl_vil.data.folder_records`); its listing is then part of the data's identity.
    """

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...] = field(default=())
    folder: FolderListing | None = field(default=None, compare=False)

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
        if self.folder is not None:
            h.update(f"files\t{self.folder.digest()}\n".encode())
        return h.hexdigest()[:16]


def count_records(url: str) -> int:
    """Number of records in one shard, read from its headers; a damaged shard raises DataConfigError."""
    with ShardRecordReader(url, expected=None) as reader:
        count, issues = reader.count_all()
    shard_level = [i for i in issues if i.category in ("truncated_shard", "unreadable_shard")]
    if shard_level:
        raise DataConfigError(f"cannot count the records of {url}: {shard_level[0].describe()}")
    return count


def load_shard_sizes(location: str) -> dict[str, int]:
    """Shard basename -> record count from one sidecar file (a manifest, ``_info.json`` or ``sizes.json``) at a
    local path or a URL gopen reads."""
    if is_remote(location):
        _check_remote_reader(location)
    data, why = _fetch_json(location)
    if data is None:
        raise DataConfigError(f"cannot read {location}: {why}; expected a sizes.json ({{shard file: record count}}), "
                              "_info.json or manifest-<split>.json", key="shard_sizes")
    try:
        return sidecar_json_counts(data, source=location)
    except DataConfigError as err:
        raise DataConfigError(err.detail, key="shard_sizes") from None


def _remote_sidecars(base: str) -> tuple[dict[str, int], dict[frozenset[str], list[str]], list[str]]:
    """(counts, {manifest's files: its classes}, why each sidecar was missing) of the remote directory ``base``."""
    counts: dict[str, int] = {}
    classes: dict[frozenset[str], list[str]] = {}
    missing: list[str] = []
    info, why = _fetch_json(base + TIMM_INFO)
    if info is None:
        missing.append(f"{TIMM_INFO} ({why})")
    else:
        counts.update(sidecar_json_counts(info, source=base + TIMM_INFO))
    sizes, why = _fetch_json(base + SIZES)
    if sizes is None:
        missing.append(f"{SIZES} ({why})")
    else:
        counts.update(sidecar_json_counts(sizes, source=base + SIZES))
    for split in sorted(info.get("splits", {})) if isinstance(info, dict) else []:
        data, why = _fetch_json(f"{base}manifest-{split}.json")
        if data is not None:
            shards, names = parse_manifest(data, source=f"{base}manifest-{split}.json")
            counts.update({s.file: s.num_samples for s in shards})
            classes[frozenset(s.file for s in shards)] = names
    return counts, classes, missing


def resolve_shard_set(
    spec: ShardSpec,
    *,
    split: str | None = None,
    allow_pipe: bool = False,
    shard_sizes: Mapping[str, int] | None = None,
    prefer_split: str | None = None,
) -> ShardSet:
    """URLs of ``spec`` with record counts from ``shard_sizes`` (basename or URL -> count), the sidecars next to
    the shards (manifest, ``sizes.json``, ``_info.json``; fetched for remote shards), or, for local shards
    without any, a header scan. ``prefer_split`` picks a directory's split when it holds several and ``split``
    is None."""
    urls, known, classes = _resolve_all(spec, split, allow_pipe, prefer_split)
    given = dict(shard_sizes or {})
    by_dir: dict[str, dict[str, int]] = {}
    remote: dict[str, tuple[dict[str, int], dict[frozenset[str], list[str]], list[str]]] = {}
    counts: list[int] = []
    unsized: list[str] = []
    for url in urls:
        base = os.path.basename(url.split("?", 1)[0])
        if url in given or base in given:
            counts.append(int(given.get(url, given.get(base, 0))))
            continue
        if url in known:
            counts.append(known[url])
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
            continue
        if url.startswith("pipe:"):
            raise DataConfigError(
                f"no record count for shard {url}: a pipe: URL has no location to read the sidecars from; expected "
                "shard_sizes (data.shard_sizes in a run config) naming a sizes.json, _info.json or "
                "manifest-<split>.json (path or URL) that lists this shard", key="shard_sizes")
        where = _url_dir(url)
        if where not in remote:
            remote[where] = _remote_sidecars(where)
        if base not in remote[where][0]:
            raise DataConfigError(
                f"no record count for remote shard {url}: none of the sidecars at {where} lists it (tried "
                f"{', '.join(remote[where][2]) or f'{TIMM_INFO}, {SIZES} and the manifests it names'}); expected "
                "the sidecars python -m ssl_vil.data.make_shards writes served beside the shards, or shard_sizes "
                "(data.shard_sizes in a run config) naming a sizes.json (path or URL)", key="shard_sizes")
        counts.append(remote[where][0][base])
    if unsized:
        logger.warning("no sidecar lists %d local shard(s); counting their records from tar headers", len(unsized))
        scanned = {u: count_records(u) for u in unsized}
        counts = [scanned[u] if c < 0 else c for u, c in zip(urls, counts)]
    if not classes:
        local_dirs = {os.path.dirname(os.path.abspath(local_path(u))) for u in urls if is_local(u)}
        files = {os.path.basename(u.split("?", 1)[0]) for u in urls}
        if len(local_dirs) == 1:
            classes = sidecar_classes(Path(local_dirs.pop()), files)
        elif len(remote) == 1:
            classes = next((names for listed, names in next(iter(remote.values()))[1].items() if files & listed), [])
    return ShardSet(tuple(urls), tuple(counts), tuple(classes))
