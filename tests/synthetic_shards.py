"""Synthetic shards whose samples expose their identity, for tests and smoke runs.

Sample ``i`` of shard ``s`` has key ``<prefix>s{s:03d}i{i:05d}`` and label ``(s * 1000 + i) % num_classes``; its
image is a deterministic pattern of that global index (the first row's first pixels spell the index in base 256
and the rest is noise seeded from it), so any two samples have different pixels. A manifest and the other
sidecars are written like ``make_shards`` does.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from ssl_vil.infra.files import atomic_output
from ssl_vil.data.manifest import Manifest, ShardInfo, write_manifest
from ssl_vil.data.shard_writer import file_sha256


def synthetic_key(prefix: str, shard: int, index: int) -> str:
    return f"{prefix}s{shard:03d}i{index:05d}"


def synthetic_image(uid: int, size: int = 16) -> np.ndarray:
    """(size, size, 3) uint8 image unique to ``uid``."""
    rng = np.random.default_rng(uid)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    for c in range(3):
        pixels[0, c] = (uid >> (8 * c)) & 0xFF
    return pixels


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_synthetic_shards(
    out_dir: str | Path,
    sizes: Sequence[int],
    *,
    prefix: str = "syn",
    split: str = "train",
    image_size: int = 16,
    num_classes: int = 10,
) -> Manifest:
    """Write ``len(sizes)`` shards ``<prefix>-<split>-000000.tar``... holding ``sizes[s]`` samples each."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, n in enumerate(sizes):
        path = out / f"{prefix}-{split}-{s:06d}.tar"
        with atomic_output(path) as handle:
            writer = wds.TarWriter(handle, mtime=0)
            for i in range(n):
                uid = s * 100_000 + i
                writer.write({
                    "__key__": synthetic_key(prefix, s, i),
                    "png": encode_png(synthetic_image(uid, image_size)),
                    "cls": (s * 1000 + i) % num_classes,
                })
            writer.close()
        shards.append(ShardInfo(path.name, n, file_sha256(path), path.stat().st_size))
    manifest = Manifest(out, prefix, split, shards, [str(c) for c in range(num_classes)], {"source": "synthetic"})
    write_manifest(manifest)
    return manifest
