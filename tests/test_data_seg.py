"""Segmentation data: builtin:digits-seg, masks in shards (make_shards --masks), random-access pairs."""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vil.data import digits_seg
from ssl_vil.data.decode import decode_record
from ssl_vil.data.errors import DataConfigError
from ssl_vil.data.make_shards import main, make_shards
from ssl_vil.data.manifest import read_manifest
from ssl_vil.data.seg_pairs import SegPair, SegPairs, open_seg_pairs
from ssl_vil.data.sources import digits_split_indices
from ssl_vil.data.tar_records import ShardRecordReader, image_member, split_member_name

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", *(str(d) for d in range(10))]


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image)


def _digest(split: str) -> str:
    images, masks = digits_seg.digits_seg_png_bytes(split)
    h = hashlib.sha256()
    for data in images + masks:
        h.update(data)
    return h.hexdigest()


# ---- builtin:digits-seg --------------------------------------------------------------------------------------


def test_generation_is_bitwise_deterministic():
    before = {split: _digest(split) for split in ("val",)}
    for cached in (digits_seg.digits_seg_layout, digits_seg.digits_seg_arrays, digits_seg.digits_seg_png_bytes):
        cached.cache_clear()
    assert {split: _digest(split) for split in ("val",)} == before  # a second generation, byte for byte
    # (the CLI test below compares a generation in another process with this one, for both splits)


def test_splits_use_disjoint_digit_instances():
    used = {split: digits_seg.digits_seg_digits(split) for split in ("train", "val")}
    assert [len(used["train"]), len(used["val"])] == [1000, 200]
    for split, canvases in used.items():
        assert all(3 <= len(c) <= 6 for c in canvases)
        assert {d for c in canvases for d in c} <= set(digits_split_indices(split))
    assert not {d for c in used["train"] for d in c} & {d for c in used["val"] for d in c}
    for canvas in digits_seg.digits_seg_layout("train")[:50]:
        assert len({p.cell for p in canvas}) == len(canvas)  # distinct cells, so digits never overlap
        for p in canvas:
            row, col = divmod(p.cell, 4)
            assert 20 <= p.side <= 32
            assert row * 32 <= p.top and p.top + p.side <= row * 32 + 32
            assert col * 32 <= p.left and p.left + p.side <= col * 32 + 32


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_label_exactly_the_bright_digit_pixels(split):
    images, masks = digits_seg.digits_seg_png_bytes(split)
    layout = digits_seg.digits_seg_layout(split)
    assert len(images) == len(masks) == len(layout) == {"train": 1000, "val": 200}[split]
    seen: set[int] = set()
    for image_png, mask_png, canvas in zip(images, masks, layout):
        with Image.open(io.BytesIO(image_png)) as image, Image.open(io.BytesIO(mask_png)) as mask:
            assert (image.mode, image.size, mask.mode, mask.size) == ("RGB", (128, 128), "L", (128, 128))
        rgb, labels = _pixels(image_png), _pixels(mask_png)
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()  # gray replicated
        assert labels.max() <= 10
        assert np.array_equal(labels > 0, rgb[..., 0] >= 64)
        expected = np.zeros_like(labels)
        for p in canvas:
            square = np.s_[p.top : p.top + p.side, p.left : p.left + p.side]
            expected[square] = np.where(rgb[..., 0][square] >= 64, p.label + 1, 0)
        assert np.array_equal(labels, expected)  # digit d is d + 1, inside its own square only
        seen.update(np.unique(labels).tolist())
    if split == "train":
        assert seen == set(range(11))


# ---- make_shards writes the masks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory) -> Path:
    """digits-seg train written by the CLI in another process (default shuffled order, 2 shards), val in this one
    (source order)."""
    out = tmp_path_factory.mktemp("digits_seg")
    proc = subprocess.run([sys.executable, "-m", "ssl_vil.data.make_shards", "builtin:digits-seg", str(out),
                           "--split", "train", "--maxcount", "600"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    make_shards("builtin:digits-seg", out, split="val", shuffle_seed=None, progress=False)
    return out


def _tar_records(urls: list[str]) -> list[tuple[str, dict[str, bytes]]]:
    out: list[tuple[str, dict[str, bytes]]] = []
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, ext = split_member_name(member.name)
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                out[-1][1][ext] = tar.extractfile(member).read()
    return out


def test_digits_seg_shards_hold_masks_and_pair_up(seg_shards):
    for split, count in (("train", 1000), ("val", 200)):
        manifest = read_manifest(seg_shards, split)
        assert manifest.num_samples == count and manifest.classes == CLASSES
        assert manifest.extra["masks"] is True and manifest.extra["skipped"] == []
        records = _tar_records(manifest.urls)
        pairs = open_seg_pairs(str(seg_shards), split)
        assert isinstance(pairs, SegPairs) and len(pairs) == count and pairs.classes == CLASSES
        keys = pairs.keys()
        assert keys == [k for k, _ in records] and len(set(keys)) == count  # shard order, unique
        assert all(set(members) == {"png", "mask.png", "json"} for _, members in records)
        builtin = open_seg_pairs("builtin:digits-seg", split)
        assert len(builtin) == count and builtin.classes == CLASSES
        by_key = {builtin[i].key: builtin[i] for i in range(len(builtin))}
        for i, (key, members) in enumerate(records):
            pair = pairs[i]
            assert pair == SegPair(key, members["png"], members["mask.png"])
            # Written by another process (train) or this one (val): the same bytes as this generation.
            assert pair == by_key[key]
    assert [k for k in open_seg_pairs(str(seg_shards), "val").keys()] == [f"dseg_val_{n:04d}" for n in range(200)]
    assert len(read_manifest(seg_shards, "train").shards) == 2
    with pytest.raises(DataConfigError, match="pass split="):
        open_seg_pairs(str(seg_shards))  # two splits here: the split must be named


def test_pretraining_decoding_ignores_the_mask(seg_shards):
    manifest = read_manifest(seg_shards, "val")
    builtin = open_seg_pairs("builtin:digits-seg", "val")
    with ShardRecordReader(manifest.urls[0], manifest.counts[0]) as reader:
        records = reader.read(0, 5)
    for record in records:
        assert record.error is None and image_member(record.members) == "png"
        image, label = decode_record(record.members, url=manifest.urls[0], record=record.index, key=record.key,
                                     max_pixels=1 << 20)
        canvas = _pixels(builtin[builtin.keys().index(record.key)].image)
        assert label == -1 and image.size == (128, 128) and np.array_equal(np.asarray(image), canvas)


def test_pairs_pickle_and_load_in_dataloader_workers(seg_shards):
    pairs = open_seg_pairs(str(seg_shards), "val")
    expected = [pairs[i] for i in range(len(pairs))]  # opens the shard in this process before the workers fork
    assert pairs[-1] == expected[-1]
    with pytest.raises(IndexError):
        pairs[len(pairs)]
    copy = pickle.loads(pickle.dumps(pairs))
    assert copy.keys() == pairs.keys() and copy[7] == expected[7] and copy.source == pairs.source
    builtin = open_seg_pairs("builtin:digits-seg", "val")
    assert pickle.loads(pickle.dumps(builtin))[3] == builtin[3]
    loader = torch.utils.data.DataLoader(pairs, batch_size=None, num_workers=2)
    assert list(loader) == expected


# ---- a folder of images with --masks ---------------------------------------------------------------------------


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def seg_folder(tmp_path) -> Path:
    """``data/images/**`` (flat and nested, PNG and JPEG) with ``data/masks/**.png`` and ``data/classes.txt``."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for n, rel in enumerate(["a.png", "b.jpg", "sub/c.png", "sub/deeper/d.jpg", "sub/deeper/e.png", "z/f.png"]):
        height, width = 8 + n, 12 - n
        image = root / "images" / rel
        mask = (root / "masks" / rel).with_suffix(".png")
        for path in (image, mask):
            path.parent.mkdir(parents=True, exist_ok=True)
        fmt = "JPEG" if rel.endswith(".jpg") else "PNG"
        image.write_bytes(_png(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), fmt))
        labels = rng.integers(0, 3, (height, width), dtype=np.uint8)
        labels[0, 0] = 255  # ignore
        mask.write_bytes(_png(labels))
    (root / "classes.txt").write_text("background\nroad\ncar\n")
    return root


def test_folder_with_masks_round_trips(seg_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(seg_folder / "images"), str(out), "--masks", str(seg_folder / "masks"), "--mask-classes",
                 str(seg_folder / "classes.txt"), "--no-shuffle", "--maxcount", "4"]) == 0
    manifest = read_manifest(out)
    assert manifest.classes == ["background", "road", "car"] and manifest.extra["masks"] is True
    assert manifest.counts == [4, 2] and manifest.extra["skipped"] == []
    from_shards, from_folder = open_seg_pairs(str(out)), open_seg_pairs(str(seg_folder))
    expected_keys = ["a", "b", "sub_c", "sub_deeper_d", "sub_deeper_e", "z_f"]
    assert from_shards.keys() == from_folder.keys() == expected_keys
    assert from_shards.classes == from_folder.classes == ["background", "road", "car"]
    for i, key in enumerate(expected_keys):
        rel = key.replace("_", "/")
        image = next((seg_folder / "images").glob(f"{rel}.*"))
        mask = seg_folder / "masks" / f"{rel}.png"
        assert from_shards[i] == from_folder[i] == SegPair(key, image.read_bytes(), mask.read_bytes())
    # A rerun with other mask class names is another output, refused rather than relabelled.
    (tmp_path / "other.txt").write_text("bg\nroad\ncar\n")
    assert main([str(seg_folder / "images"), str(out), "--masks", str(seg_folder / "masks"), "--mask-classes",
                 str(tmp_path / "other.txt"), "--no-shuffle", "--maxcount", "4"]) == 2
    assert "another source or other options" in capsys.readouterr().err


def test_missing_mask_is_refused_before_writing(seg_folder, tmp_path, capsys):
    (seg_folder / "masks" / "sub" / "deeper" / "e.png").unlink()
    out = tmp_path / "out"
    assert main([str(seg_folder / "images"), str(out), "--masks", str(seg_folder / "masks")]) == 2
    err = capsys.readouterr().err
    image, mask = seg_folder / "images" / "sub/deeper/e.png", seg_folder / "masks" / "sub/deeper/e.png"
    assert f"image {image} has no mask: expected {mask}" in err and "Traceback" not in err
    assert not out.exists() or not list(out.iterdir())
    with pytest.raises(DataConfigError, match=f"image {image} has no mask: expected {mask}"):
        open_seg_pairs(str(seg_folder))


def test_bad_masks_are_skipped_and_reported(seg_folder, tmp_path):
    (seg_folder / "masks" / "a.png").write_bytes(_png(np.zeros((8, 12, 3), dtype=np.uint8)))  # RGB, not labels
    (seg_folder / "masks" / "z" / "f.png").write_bytes(_png(np.zeros((3, 3), dtype=np.uint8)))  # wrong size
    manifest = make_shards(str(seg_folder / "images"), tmp_path / "out", masks=seg_folder / "masks",
                           shuffle_seed=None, progress=False)
    assert manifest.num_samples == 4 and manifest.classes == []
    reasons = {Path(s["source"]).name: s["reason"] for s in manifest.extra["skipped"]}
    assert reasons.keys() == {"a.png", "f.png"}
    assert reasons["a.png"].startswith("mask has mode RGB, expected one class index per pixel (mode L or P)")
    assert reasons["f.png"].startswith("mask is 3x3 but its image is 7x13")
    assert open_seg_pairs(str(tmp_path / "out")).keys() == ["b", "sub_c", "sub_deeper_d", "sub_deeper_e"]


def test_shards_without_masks_are_refused(tmp_path):
    folder = tmp_path / "cls" / "cat"
    folder.mkdir(parents=True)
    (folder / "x.png").write_bytes(_png(np.zeros((4, 4, 3), dtype=np.uint8)))
    manifest = make_shards(str(tmp_path / "cls"), tmp_path / "out", progress=False)
    assert "masks" not in manifest.extra
    shard = manifest.urls[0]
    with pytest.raises(DataConfigError) as err:
        open_seg_pairs(str(tmp_path / "out"))
    assert str(err.value) == (f"{shard}: record 'cat_x' has no mask.png member: write the shards with "
                              "make_shards --masks")


def test_bad_locations_are_refused(tmp_path):
    with pytest.raises(DataConfigError, match="local files only"):
        open_seg_pairs("https://example.com/shards/")
    with pytest.raises(DataConfigError, match="needs split 'train' or 'val'"):
        open_seg_pairs("builtin:digits-seg")
    with pytest.raises(DataConfigError, match="neither manifest-<split>.json nor images/ and masks/"):
        open_seg_pairs(str(tmp_path))
