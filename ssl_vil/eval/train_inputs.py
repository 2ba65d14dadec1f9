"""Training inputs for supervised fine-tuning: shuffled, sharded over ranks, resumable at any batch.

Shards use :func:`ssl_vil.data.train_stream.build_train_stream` (epoch mode, ``drop_last``). An ImageFolder gets
:class:`ImageFolderTrainStream` with the same contract: the order of an epoch is a pure function of
``(seed, epoch, global batch size)``, rank ``r`` takes samples ``[r*B, (r+1)*B)`` of every global batch, each
sample's augmentation is seeded from ``(seed, epoch, sample)``, and the cursor ``(epoch, batches consumed)`` is
saved with ``state_dict()``. Batches are ``{"keys", "labels" (B,), "views" (B, 3, H, W), "epoch",
"batch_in_epoch"}``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import ImageFolder

from ssl_vil.data.cursor import EpochCursor, ResumableStream
from ssl_vil.data.seeding import make_generator, stable_seed
from ssl_vil.eval.inputs import is_image_folder

IMAGEFOLDER_CURSOR_FORMAT = "ssl_vil.evaluation.imagefolder_cursor/1"


class SeededTransform:
    """Run a transform that draws from the global RNGs (timm's RandAugment, RandomErasing...) under a seed taken
    from ``generator``, leaving the process's RNG states as they were.

    The augmentation of a sample then depends only on its seed, not on which worker ran it or what ran before:
    the property that makes a resumed run see exactly the views an uninterrupted one sees.
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Any, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.manual_seed(seed)
                return self.transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _EpochSamples(torch.utils.data.Dataset):
    """Samples ``positions`` of an ImageFolder, transformed with per-sample seeds."""

    def __init__(self, folder: ImageFolder, positions: list[int], transform: SeededTransform, seed: int,
                 epoch: int) -> None:
        self.folder, self.positions, self.transform = folder, positions, transform
        self.seed, self.epoch = seed, epoch
        self.root = Path(folder.root)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        index = self.positions[i]
        path, label = self.folder.samples[index]
        generator = make_generator(stable_seed(self.seed, "imagefolder-sample", self.epoch, index))
        return self.transform(self.folder.loader(path), generator), label, str(Path(path).relative_to(self.root))


class ImageFolderTrainStream(ResumableStream):
    """One rank's shuffled training batches from a torchvision ImageFolder (contract: module docstring)."""

    cursor_format = IMAGEFOLDER_CURSOR_FORMAT
    stream_name = "ImageFolder stream"

    def __init__(self, root: str, *, transform: SeededTransform, batch_size: int, seed: int, rank: int,
                 world_size: int, num_workers: int) -> None:
        self.folder = ImageFolder(root)
        self.transform = transform
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers = num_workers
        n = len(self.folder)
        self._batches_per_epoch = n // self.global_batch_size  # drop_last: every step a full global batch
        if self._batches_per_epoch == 0:
            raise ValueError(f"{root}: {n} images are fewer than one global batch of {self.global_batch_size} "
                             f"(batch_size {batch_size} x world_size {world_size})")
        self._cursor = EpochCursor(self._batches_per_epoch)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.folder.classes)

    def _fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_samples": len(self.folder)}

    def _epoch_batches(self, epoch: int, first: int) -> Generator[dict[str, Any], None, None]:
        order = torch.randperm(len(self.folder),
                               generator=make_generator(stable_seed(self.seed, "imagefolder-order", epoch))).tolist()
        g, b = self.global_batch_size, self.batch_size
        positions = [order[s * g + self.rank * b + j]
                     for s in range(first, self._batches_per_epoch) for j in range(b)]
        loader = torch.utils.data.DataLoader(
            _EpochSamples(self.folder, positions, self.transform, self.seed, epoch), batch_size=b, shuffle=False,
            num_workers=self.num_workers, persistent_workers=False,
        )
        for index, (views, labels, keys) in enumerate(loader, start=first):
            yield {"keys": list(keys), "labels": labels.long(), "views": views, "epoch": epoch,
                   "batch_in_epoch": index}


def open_train_stream(source: str, *, transform: Callable[[Any], torch.Tensor], batch_size: int, seed: int,
                      rank: int, world_size: int, num_workers: int, split: str | None = None) -> Any:
    """ImageFolder or shard training stream (same contract, see the module docstring)."""
    seeded = SeededTransform(transform)
    if is_image_folder(source):
        return ImageFolderTrainStream(source, transform=seeded, batch_size=batch_size, seed=seed, rank=rank,
                                      world_size=world_size, num_workers=num_workers)
    from ssl_vil.data.train_stream import build_train_stream

    return build_train_stream(source, mode="epoch", batch_size=batch_size, seed=seed, rank=rank,
                              world_size=world_size, num_workers=num_workers, transform=seeded, split=split,
                              drop_last=True)


def source_classes(source: str, split: str | None = None) -> tuple[str, ...]:
    """Class names of a training source without reading images: ImageFolder sub-directories or the shard
    manifest's ``classes`` (empty when the shards do not name them)."""
    if is_image_folder(source):
        from torchvision.datasets.folder import find_classes

        return tuple(find_classes(source)[0])
    from ssl_vil.data.shardlist import resolve_shard_set

    return tuple(resolve_shard_set(source, split=split).classes)
