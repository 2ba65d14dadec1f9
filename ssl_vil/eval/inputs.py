"""Evaluation inputs: a WebDataset shard set or a torchvision ImageFolder, read exactly once across ranks.

Both yield batches ``{"keys": list[str], "labels": (B,) int64, "images": (B, 3, H, W) float}``. Shards go
through :func:`ssl_vil.data.build_eval_stream`; an ImageFolder is split by index (sample i -> rank i % world).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torchvision import transforms
from torchvision.datasets import ImageFolder

from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid

# DINO / DINOv2 k-NN and linear eval: resize 256 -> center crop 224, i.e. crop fraction 0.875.
DEFAULT_CROP_PCT = 0.875


@dataclass(kw_only=True, slots=True)
class EvalInputsConfig(Config):
    """What every evaluation CLI reads: the weights, the train/val data, how to load it, where to write."""

    weights: str
    model: str | None
    train_data: str
    val_data: str
    train_split: str | None
    val_split: str | None
    batch_size: int
    num_workers: int
    img_size: int | None
    crop_pct: float | None
    device: Literal["auto", "cpu", "cuda"]
    output_dir: str | None

    def validate(self) -> None:
        if self.batch_size < 1:
            raise invalid("batch_size", self.batch_size, "an int >= 1")
        if self.num_workers < 0:
            raise invalid("num_workers", self.num_workers, "an int >= 0")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise invalid("crop_pct", self.crop_pct, "a fraction in (0, 1]")


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


class _KeyedImageFolder(torch.utils.data.Dataset):
    """(image, label, key) for the given indices of an ImageFolder; key = path relative to the root."""

    def __init__(self, folder: ImageFolder, indices: list[int]) -> None:
        self.folder, self.indices = folder, indices
        self.root = Path(folder.root)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.folder.samples[self.indices[i]]
        image = self.folder.transform(self.folder.loader(path))
        return image, label, str(Path(path).relative_to(self.root))


def _collate(items: list[tuple[torch.Tensor, int, str]]) -> dict[str, Any]:
    images, labels, keys = zip(*items)
    return {"keys": list(keys), "labels": torch.tensor(labels, dtype=torch.long), "images": torch.stack(images)}


@dataclass
class EvalSource:
    """One split to evaluate: ``batches()`` yields this rank's share; sizes are global when known.

    ``error_totals()``: this rank's counts of unreadable records skipped so far (shards; empty for ImageFolder,
    where an unreadable image raises).
    """

    description: str
    num_samples: int | None
    classes: list[str]
    _make: Callable[[], Iterable[dict[str, Any]]]
    error_totals: Callable[[], dict[str, int]] = dict

    def batches(self) -> Iterator[dict[str, Any]]:
        yield from self._make()


def open_eval_source(
    source: str,
    *,
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    split: str | None = None,
) -> EvalSource:
    """Open ``source`` (ImageFolder directory, or shard dir / glob / URL) for one exactly-once pass."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if is_image_folder(source):
        return _image_folder_source(source, transform, batch_size, rank, world_size, num_workers)
    return _shard_source(source, transform, batch_size, rank, world_size, num_workers, split)


def _image_folder_source(root: str, transform, batch_size, rank, world_size, num_workers) -> EvalSource:
    folder = ImageFolder(root, transform=transform)
    indices = list(range(rank, len(folder), world_size))

    def make() -> Iterable[dict[str, Any]]:
        return torch.utils.data.DataLoader(
            _KeyedImageFolder(folder, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
            collate_fn=_collate, persistent_workers=False,
        )

    return EvalSource(f"ImageFolder {root}", len(folder), list(folder.classes), make)


def default_split(source: str, preferred: str) -> str | None:
    """``preferred`` when ``source`` is a shard directory holding several splits including it, else None.

    Lets ``--train-data OUT --val-data OUT`` work on one directory written with ``make_shards --split train|val``.
    """
    from ssl_vil.data.manifest import list_splits

    if not os.path.isdir(source):
        return None
    splits = list_splits(source)
    return preferred if len(splits) > 1 and preferred in splits else None


def _shard_source(source, transform, batch_size, rank, world_size, num_workers, split) -> EvalSource:
    try:
        from ssl_vil.data import build_eval_stream
    except ImportError:  # the package may not re-export it
        from ssl_vil.data.eval_stream import build_eval_stream

    stream = build_eval_stream(source, batch_size=batch_size, rank=rank, world_size=world_size, transform=transform,
                               num_workers=num_workers, split=split)
    return EvalSource(f"shards {source}" + (f" [{split}]" if split else ""), stream.shards.num_samples,
                      list(stream.classes), lambda: stream, lambda: dict(stream.error_totals))
