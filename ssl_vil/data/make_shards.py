"""Write WebDataset shards (plus manifest, timm ``_info.json``, ``sizes.json``, ``__len__``) from images.

Usage::

    python -m ssl_vil.data.make_shards SRC OUT_DIR [--split train|val] [--maxcount N] [--maxsize BYTES]
                                       [--workers N] [--name NAME] [--shuffle-seed S | --no-shuffle] [--verify]
                                       [--classes-from PATH] [--masks DIR [--mask-classes FILE]]

``SRC`` is an ImageFolder root (``SRC/<class>/<image>``), a text file of ``path[<TAB>label]`` lines,
``builtin:digits`` (scikit-learn's 1797 digits as 32x32 RGB PNGs; ``--split`` picks the fixed train (1297) or
val (500) part), or ``builtin:digits-seg`` (128x128 canvases of digits with segmentation masks; train 1000, val
200; see :mod:`ssl_vil.data.digits_seg`). Shards are ``OUT_DIR/<name>-<split>-000000.tar``...; several splits
can share ``OUT_DIR``.

Segmentation: with ``--masks DIR``, ``SRC`` is a directory of images, flat or nested (``SRC/**/<image>``; its
sub-directories are not classes), and the mask of ``SRC/<rel>/<stem>.<ext>`` is ``DIR/<rel>/<stem>.png`` (one
class index per pixel, mode L or P); an image without its mask is refused before any shard is written.
``--mask-classes FILE`` (one class name per line; line n names mask value n - 1) becomes the manifest's
``classes``. Each record then also holds ``<key>.mask.png``, and the manifest records ``"masks": true``;
``builtin:digits-seg`` writes its masks and its 11 class names (background, 0-9) the same way.

Labels index the source's own class list unless ``--classes-from`` names another one (an ImageFolder root, a
``manifest-<split>.json``, or a shard directory with one manifest): then they index that list, matched by name, so
a val folder lacking a class gets the train split's numbers; a class missing from that list is refused.
Evaluation matches classes by name either way.

Reruns: on a complete split (its ``manifest-<split>.json`` matches the plan) nothing is done; after an
interruption the missing shards are written (existing ones are complete: shards appear by atomic rename); an
output made from another source or other options is refused with a message, never overwritten.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import importlib
import json
import multiprocessing as mp
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from ssl_vil.data.errors import DataConfigError
from ssl_vil.data.manifest import (
    Manifest,
    ShardInfo,
    class_label_map,
    list_splits,
    manifest_path,
    read_manifest,
    write_manifest,
)
from ssl_vil.data.sources import DIGITS_SEG_SPEC, DIGITS_SPEC, Source, image_folder_classes, open_source
from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors
from ssl_vil.infra.files import write_bytes_atomic

if TYPE_CHECKING:
    from ssl_vil.data.shard_writer import PLAN_FORMAT, ShardPlan, ShardResult, file_sha256, plan_shards, write_shard

# The shard writer (webdataset, which imports torch) loads when shards are written, not for --help; its names are
# still attributes of this module (``make_shards.write_shard``), and one set here first (a test's stand-in) wins.
_WRITER_NAMES = ("PLAN_FORMAT", "ShardPlan", "ShardResult", "file_sha256", "plan_shards", "write_shard")


def _load_writer() -> None:
    module = importlib.import_module("ssl_vil.data.shard_writer")
    for name in _WRITER_NAMES:
        globals().setdefault(name, getattr(module, name))


def __getattr__(name: str) -> Any:
    if name in _WRITER_NAMES:
        _load_writer()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PROG = "python -m ssl_vil.data.make_shards"


class OutputConflict(DataConfigError):
    """OUT_DIR holds shards that this run must not touch."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    add_version(parser)
    parser.add_argument("src", help=f"ImageFolder root, text file list, {DIGITS_SPEC} or {DIGITS_SEG_SPEC}; with "
                                    "--masks, a directory of images")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--split", default="train",
                        help="split name in the shard file names (digits, digits-seg: train|val)")
    parser.add_argument("--maxcount", type=int, default=1000, help="records per shard at most (default 1000)")
    parser.add_argument("--maxsize", type=int, default=500_000_000, help="bytes per shard at most (default 5e8)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    parser.add_argument("--name", default=None, help="dataset name prefix (default: digits / the source's name)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=0, help="seed of the record order (default 0)")
    order.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    parser.add_argument("--verify", action="store_true", help="fully decode every image (default: header only)")
    parser.add_argument("--classes-from", default=None, metavar="PATH",
                        help="index labels by this class list (ImageFolder root, manifest-<split>.json, or a shard "
                             "dir with one manifest) instead of the source's own")
    parser.add_argument("--masks", type=Path, default=None, metavar="DIR",
                        help="segmentation masks: the mask of SRC/<rel>/<stem>.<ext> is DIR/<rel>/<stem>.png "
                             "(SRC is then a flat or nested directory of images, not of classes)")
    parser.add_argument("--mask-classes", type=Path, default=None, metavar="FILE",
                        help="names of the mask values, one per line (line n names value n - 1); with --masks")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.mask_classes is not None and args.masks is None:
        parser.error("--mask-classes needs --masks DIR")
    return args


def _existing_result(path: Path) -> ShardResult:
    """Result of a shard a previous, interrupted run already renamed into place."""
    from ssl_vil.data.shardlist import count_records

    _load_writer()
    return ShardResult(path.name, count_records(str(path)), file_sha256(path), path.stat().st_size, [])


_SOURCE: Source | None = None


def _init_worker(source: Source) -> None:
    global _SOURCE
    _SOURCE = source


def _write_task(task: tuple[str, list, bool]) -> ShardResult:
    path, items, verify = task
    assert _SOURCE is not None
    _load_writer()  # a spawned worker process starts without it
    return write_shard(Path(path), items, _SOURCE.classes, verify=verify)


def _check_previous(out: Path, split: str, plan: ShardPlan) -> bool:
    """True when the split is already complete; raises OutputConflict for outputs this plan must not touch."""
    if manifest_path(out, split).exists():
        manifest = read_manifest(out, split)
        if manifest.extra.get("plan_digest") != plan.digest:
            raise OutputConflict(
                f"{manifest_path(out, split)} describes split {split!r} made from another source or other options "
                f"({manifest.extra.get('source')}, {manifest.extra.get('options')}); use another OUT_DIR or delete "
                f"that split's files ({plan.prefix}-*.tar and the manifest) first"
            )
        for shard in manifest.shards:
            path = out / shard.file
            if not path.exists() or path.stat().st_size != shard.bytes:
                raise OutputConflict(
                    f"split {split!r} is complete per its manifest but {path} is missing or changed size; delete "
                    f"{manifest_path(out, split).name} and the split's shards to rebuild it"
                )
        return True
    plan_file = out / f".{plan.prefix}.plan.json"
    expected = {plan.filename(i) for i in range(len(plan.shards))}
    present = {p.name for p in out.glob(f"{plan.prefix}-*.tar")}
    if plan_file.exists():
        saved = json.loads(plan_file.read_text())
        if saved.get("digest") != plan.digest:
            raise OutputConflict(
                f"{out} holds a partial split {split!r} from another source or other options ({plan_file.name}: "
                f"{saved.get('source')}, {saved.get('options')}); delete {plan.prefix}-*.tar and {plan_file.name} "
                "or use another OUT_DIR"
            )
        if present - expected:
            raise OutputConflict(f"{out}: shards not in the saved plan: {sorted(present - expected)[:5]}")
    elif present:
        raise OutputConflict(
            f"{out} already holds {len(present)} {plan.prefix}-*.tar shard(s) without a manifest or plan; refusing "
            "to overwrite them (delete them or use another OUT_DIR)"
        )
    return False


def reference_classes(path: str | os.PathLike[str]) -> list[str]:
    """The class list named by ``--classes-from``: ImageFolder sub-directories, a manifest file's ``classes``, or
    the ``classes`` of the one manifest in a shard directory."""
    target = Path(path)
    if target.is_file():
        try:
            classes = json.loads(target.read_text()).get("classes")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise DataConfigError(f"--classes-from {target}: not a shard manifest ({exc})") from exc
    elif target.is_dir() and list_splits(target):
        classes = read_manifest(target).classes
    elif target.is_dir():
        classes = image_folder_classes(target)
    else:
        raise DataConfigError(f"--classes-from {target}: no such file or directory")
    if not classes:
        raise DataConfigError(f"--classes-from {target}: names no classes")
    return list(classes)


def _reindex(source: Source, classes: list[str], origin: str) -> None:
    """Relabel ``source`` in place so its labels index ``classes`` (by name)."""
    mapping = class_label_map(classes, source.classes, reference_source=f"--classes-from {origin}",
                              other_source=f"source {source.description}")
    if mapping is not None:
        source.items = [replace(item, label=mapping[item.label]) if item.label >= 0 else item for item in source.items]
    source.classes = list(classes)


def make_shards(
    src: str,
    out_dir: Path,
    *,
    split: str = "train",
    maxcount: int = 1000,
    maxsize: int = 500_000_000,
    workers: int = 1,
    name: str | None = None,
    shuffle_seed: int | None = 0,
    verify: bool = False,
    progress: bool = True,
    classes_from: str | os.PathLike[str] | None = None,
    masks: str | os.PathLike[str] | None = None,
    mask_classes: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Write (or finish) the shards of ``split``; returns its manifest. See the module docstring."""
    _load_writer()
    source = open_source(src, split, masks=None if masks is None else Path(masks),
                         mask_classes=None if mask_classes is None else Path(mask_classes))
    if classes_from is not None and source.has_masks:
        raise DataConfigError("--classes-from relabels image-level classes; a segmentation source has none (name "
                              "its mask values with --mask-classes)")
    if classes_from is not None:
        _reindex(source, reference_classes(classes_from), str(classes_from))
    if name is not None:
        source.name = name
    if "." in source.name or "/" in source.name:
        raise DataConfigError(f"dataset name {source.name!r} must not contain '.' or '/'")
    plan = plan_shards(source, split, maxcount=maxcount, maxsize=maxsize, shuffle_seed=shuffle_seed, verify=verify,
                       classes_from=None if classes_from is None else str(classes_from))
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".{plan.prefix}-*.tmp-*"):
        stale.unlink(missing_ok=True)  # temporaries of a writer that died; never complete shards
    if _check_previous(out_dir, split, plan):
        print(f"{out_dir}: split {split!r} is complete ({len(plan.shards)} shards); nothing to do", file=sys.stderr)
        return read_manifest(out_dir, split)
    plan_file = out_dir / f".{plan.prefix}.plan.json"
    write_bytes_atomic(
        plan_file,
        json.dumps({"format": PLAN_FORMAT, "digest": plan.digest, "source": source.description,
                    "options": plan.options, "num_shards": len(plan.shards)}).encode(),
    )
    todo = [i for i in range(len(plan.shards)) if not (out_dir / plan.filename(i)).exists()]
    results: dict[int, ShardResult] = {}
    for i in range(len(plan.shards)):
        if i not in todo:
            results[i] = _existing_result(out_dir / plan.filename(i))
    total = sum(len(plan.shards[i]) for i in todo)
    done_before = sum(len(s) for s in plan.shards) - total
    if done_before:
        print(f"resuming: {len(plan.shards) - len(todo)} of {len(plan.shards)} shards already written", file=sys.stderr)
    with tqdm(total=total, unit="img", desc=plan.prefix, disable=not progress, smoothing=0.1) as bar:
        if workers == 1:
            for i in todo:
                results[i] = write_shard(out_dir / plan.filename(i), plan.shards[i], source.classes, verify=verify,
                                         on_item=lambda: bar.update(1))
                bar.update(len(plan.shards[i]) - results[i].num_samples)  # skipped items count as processed
        else:
            tasks = {i: (str(out_dir / plan.filename(i)), plan.shards[i], verify) for i in todo}
            with futures.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                             initargs=(source,)) as pool:
                pending = {pool.submit(_write_task, task): i for i, task in tasks.items()}
                for fut in futures.as_completed(pending):
                    i = pending[fut]
                    results[i] = fut.result()
                    bar.update(len(plan.shards[i]))
    skipped = [{"source": ref, "reason": why} for i in sorted(results) for ref, why in results[i].skipped]
    for entry in skipped:
        print(f"skipped {entry['source']}: {entry['reason']}", file=sys.stderr)
    manifest = Manifest(
        root=out_dir,
        name=source.name,
        split=split,
        shards=[ShardInfo(r.file, r.num_samples, r.sha256, r.bytes) for _, r in sorted(results.items())],
        classes=list(source.classes),
        extra={"source": source.description, "plan_digest": plan.digest, "options": plan.options,
               "skipped": skipped},
    )
    if source.has_masks:
        manifest.extra["masks"] = True  # tells readers the split has masks without opening a shard
    write_manifest(manifest)
    plan_file.unlink(missing_ok=True)
    return manifest


@user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        manifest = make_shards(
            args.src, args.out_dir, split=args.split, maxcount=args.maxcount, maxsize=args.maxsize,
            workers=args.workers, name=args.name, shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
            verify=args.verify, classes_from=args.classes_from, masks=args.masks, mask_classes=args.mask_classes,
        )
    except DataConfigError as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{manifest.root}: split {manifest.split!r}: {manifest.num_samples} samples in {len(manifest.shards)} shards "
        f"({os.path.basename(manifest_path(manifest.root, manifest.split))})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
