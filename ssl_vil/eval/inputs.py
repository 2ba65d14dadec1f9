"""Evaluation inputs: a WebDataset shard set or an ImageFolder directory, read exactly once across ranks.

Both yield batches ``{"keys": list[str], "labels": (B,) int64, "images": (B, 3, H, W) float, "data_errors":
{category: count}}``. Shards go through :func:`ssl_vil.data.build_eval_stream`; an ImageFolder is split by index
(sample i -> rank i % world). Both decode with :func:`ssl_vil.data.decode.decode_image` (same RGB conversion,
same pixel limit) and drop, count and report unreadable images the same way.

Labels are class indices of one class list per dataset: given the train data's class names
(``open_eval_source(..., classes=...)``), val labels are remapped onto that index by name, and a val class the
train data lacks is refused (:func:`ssl_vil.data.manifest.class_label_map`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchvision import transforms

from ssl_vil.data.decode import DEFAULT_MAX_IMAGE_PIXELS, SampleIssue, decode_image
from ssl_vil.data.error_tally import ErrorTally, zero_counts
from ssl_vil.data.errors import DataError, DataIssue
from ssl_vil.data.manifest import class_label_map
from ssl_vil.data.sources import image_folder_files
from ssl_vil.eval.options import DEFAULT_CROP_PCT, EvalInputsConfig  # noqa: F401  (torch-free for the CLI parsers)


def eval_transform(img_size: int, mean: Iterable[float], std: Iterable[float],
                   crop_pct: float = DEFAULT_CROP_PCT) -> Callable[[Any], torch.Tensor]:
    """PIL image -> (3, img_size, img_size): bicubic resize of the short side to img_size / crop_pct, center crop."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize = int(math.floor(img_size / crop_pct + 1e-6))
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(mean), std=list(std)),
    ])


def is_image_folder(source: str | os.PathLike[str]) -> bool:
    """A local directory of class sub-directories (torchvision ImageFolder), as opposed to a shard directory."""
    path = Path(source)
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    if any(e.suffix == ".tar" or e.name.startswith("manifest-") for e in entries):
        return False
    return any(e.is_dir() and not e.name.startswith(".") for e in entries)


def read_image_file(path: str | os.PathLike[str], *, index: int, key: str, max_pixels: int) -> Any:
    """RGB PIL image of an image file through the shard path's decoder; :class:`SampleIssue` when unusable.

    ``index`` (the file's position in its folder listing) and ``key`` identify the file in the issue, as the
    record index and key do for a shard record.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        issue = DataIssue("undecodable_image", str(path), index, key, f"cannot read the file: {exc}")
        raise SampleIssue(issue) from exc
    return decode_image(data, url=str(path), record=index, key=key, max_pixels=max_pixels)


class FolderImages(torch.utils.data.Dataset):
    """(image (3, H, W) or None, label, key, issue or None) for the given indices of an ImageFolder listing;
    key = path relative to the root. A file that does not decode yields None and its :class:`DataIssue`."""

    def __init__(self, root: Path, samples: list[tuple[Path, int]], indices: list[int],
                 transform: Callable[[Any], torch.Tensor], max_pixels: int) -> None:
        self.root, self.samples, self.indices = root, samples, indices
        self.transform, self.max_pixels = transform, max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> tuple[Any, int, str, DataIssue | None]:
        """(decoded PIL image or None, label, key, issue or None) of the ``i``-th listed file."""
        index = self.indices[i]
        path, label = self.samples[index]
        key = str(path.relative_to(self.root))
        try:
            return read_image_file(path, index=index, key=key, max_pixels=self.max_pixels), label, key, None
        except SampleIssue as exc:
            return None, label, key, exc.issue

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str, DataIssue | None]:
        image, label, key, issue = self.read(i)
        if image is None:
            return None, label, key, issue
        try:
            return self.transform(image), label, key, None
        except Exception as exc:
            raise DataError(f"eval transform failed on {self.samples[self.indices[i]][0]}: {exc}") from exc


def _collate(items: list[tuple[torch.Tensor | None, int, str, DataIssue | None]]) -> dict[str, Any]:
    good = [(image, label, key) for image, label, key, _ in items if image is not None]
    return {"keys": [key for _, _, key in good], "labels": torch.tensor([lab for _, lab, _ in good], dtype=torch.long),
            "images": torch.stack([image for image, _, _ in good]) if good else None,
            "events": [issue for *_, issue in items if issue is not None]}


def _remap(batches: Iterable[dict[str, Any]], mapping: list[int], description: str) -> Iterator[dict[str, Any]]:
    """``batches`` with labels replaced by ``mapping[label]`` (unlabelled -1 stays -1)."""
    table = torch.tensor(mapping, dtype=torch.long)
    for batch in batches:
        labels = torch.as_tensor(batch["labels"], dtype=torch.long)
        beyond = labels >= len(mapping)
        if bool(beyond.any()):
            i = int(beyond.nonzero()[0])
            raise DataError(f"{description}: sample {batch['keys'][i]!r} has label {int(labels[i])} but the data "
                            f"names only {len(mapping)} classes")
        yield {**batch, "labels": torch.where(labels >= 0, table[labels.clamp_min(0)], labels)}


@dataclass
class EvalSource:
    """One split to evaluate: ``batches()`` yields this rank's share; sizes are global when known.

    ``classes``: the class names the delivered labels index (the train data's when opened with ``classes=``);
    ``own_classes``: the names this source itself lists. ``error_totals()``: this rank's counts of unreadable
    samples skipped so far, by category.
    """

    description: str
    num_samples: int | None
    classes: list[str]
    _make: Callable[[], Iterable[dict[str, Any]]]
    error_totals: Callable[[], dict[str, int]] = dict
    own_classes: list[str] = field(default_factory=list)
    label_map: list[int] | None = None

    def batches(self) -> Iterator[dict[str, Any]]:
        if self.label_map is None:
            yield from self._make()
        else:
            yield from _remap(self._make(), self.label_map, self.description)


def open_eval_source(
    source: str,
    *,
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    split: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    classes: Sequence[str] | None = None,
    classes_source: str = "the train data",
) -> EvalSource:
    """Open ``source`` (ImageFolder directory, or shard dir / glob / URL) for one exactly-once pass.

    ``classes``: the train data's class names (``classes_source`` describes it in messages); labels are then
    delivered as indices of that list, matched by name, and a class of ``source`` outside it raises
    :class:`~ssl_vil.data.errors.DataConfigError`. None: labels as the source stores them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if is_image_folder(source):
        opened = _image_folder_source(source, transform, batch_size, rank, world_size, num_workers, max_image_pixels)
    else:
        opened = _shard_source(source, transform, batch_size, rank, world_size, num_workers, split, max_image_pixels)
    if classes is not None:
        opened.label_map = class_label_map(classes, opened.own_classes, reference_source=classes_source,
                                           other_source=opened.description)
        opened.classes = list(classes)
    return opened


def _image_folder_source(root: str, transform, batch_size, rank, world_size, num_workers,
                         max_pixels: int) -> EvalSource:
    classes, samples = image_folder_files(Path(root))
    indices = list(range(rank, len(samples), world_size))
    tally = ErrorTally(budget_fraction=None, planned_per_epoch=len(indices), rank=rank)

    def make() -> Iterator[dict[str, Any]]:
        loader = torch.utils.data.DataLoader(
            FolderImages(Path(root), samples, indices, transform, max_pixels), batch_size=batch_size,
            shuffle=False, num_workers=num_workers, collate_fn=_collate, persistent_workers=False,
        )
        pending = zero_counts()  # issues of batches that lost every sample ride on the next batch, as for shards
        for batch in loader:
            deltas, _ = tally.add(batch.pop("events"), [])
            pending = {k: pending[k] + deltas[k] for k in pending}
            if not batch["keys"]:
                continue
            yield {**batch, "data_errors": pending}
            pending = zero_counts()

    return EvalSource(f"ImageFolder {root}", len(samples), list(classes), make, lambda: dict(tally.totals),
                      own_classes=list(classes))


def default_split(source: str, preferred: str) -> str | None:
    """``preferred`` when ``source`` is a shard directory holding several splits including it, else None.

    Lets ``--train-data OUT --val-data OUT`` work on one directory written with ``make_shards --split train|val``.
    """
    from ssl_vil.data.manifest import list_splits

    if not os.path.isdir(source):
        return None
    splits = list_splits(source)
    return preferred if len(splits) > 1 and preferred in splits else None


def _shard_source(source, transform, batch_size, rank, world_size, num_workers, split, max_pixels) -> EvalSource:
    from ssl_vil.data.eval_stream import build_eval_stream

    stream = build_eval_stream(source, batch_size=batch_size, rank=rank, world_size=world_size, transform=transform,
                               num_workers=num_workers, split=split, max_image_pixels=max_pixels)
    return EvalSource(f"shards {source}" + (f" [{split}]" if split else ""), stream.shards.num_samples,
                      list(stream.classes), lambda: stream, lambda: dict(stream.error_totals),
                      own_classes=list(stream.classes))
