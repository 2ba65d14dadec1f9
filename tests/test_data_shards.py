"""Shard writer: digits shards readable by timm and webdataset, sidecars, keys, original bytes, atomic resume."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_vil.data import read_manifest, resolve_shards
from ssl_vil.data import shard_writer
from ssl_vil.data.make_shards import make_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """Both digits splits written by the CLI, the two processes running at the same time into one directory."""
    out = tmp_path_factory.mktemp("digits")
    procs = [
        subprocess.Popen([sys.executable, "-m", "ssl_vil.data.make_shards", "builtin:digits", str(out), "--split",
                          split, "--maxcount", "400", "--workers", "2"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for split in ("train", "val")
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        assert "img/s" in stderr  # tqdm progress with rate
    return out


def test_digits_split_counts_and_sidecars(digits_dir):
    train, val = read_manifest(digits_dir, "train"), read_manifest(digits_dir, "val")
    assert (train.num_samples, val.num_samples) == (1297, 500)
    assert train.counts == [400, 400, 400, 97] and val.counts == [400, 100]
    assert train.classes == [str(d) for d in range(10)]
    for shard in train.shards + val.shards:
        data = (digits_dir / shard.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
    info = json.loads((digits_dir / "_info.json").read_text())
    assert info["name"] == "digits" and set(info["splits"]) == {"train", "val"}
    assert info["splits"]["val"] == {"name": "val", "num_samples": 500, "filenames": [s.file for s in val.shards],
                                     "shard_lengths": [400, 100]}
    sizes = json.loads((digits_dir / "sizes.json").read_text())
    assert sizes == {s.file: s.num_samples for s in train.shards + val.shards}
    assert (digits_dir / "__len__").read_text().strip() == "1797"
    assert resolve_shards(digits_dir, split="val") == [str(digits_dir / s.file) for s in val.shards]


def test_digits_read_by_timm_and_webdataset(digits_dir):
    import timm.data
    import webdataset as wds

    for split, expected in (("train", 1297), ("val", 500)):
        dataset = timm.data.create_dataset("wds/digits", root=str(digits_dir), split=split)
        labels = [target for _, target in dataset]
        assert len(labels) == expected and set(labels) == set(range(10))
        urls = sorted(glob.glob(str(digits_dir / f"digits-{split}-*.tar")))
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "cls"))
        assert len(samples) == expected and len({k for k, _, _ in samples}) == expected
        image = samples[0][1]
        assert image.size == (32, 32) and image.mode == "RGB"


def test_digits_content_and_fixed_split(digits_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    train_keys = {f"digit{i:04d}" for i in perm[:1297].tolist()}
    keys, found = set(), {}
    for shard in read_manifest(digits_dir, "train").urls:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                keys.add(key)
                if ext == "png" and key in ("digit0000", "digit1796", f"digit{perm[5].item():04d}"):
                    found[key] = tar.extractfile(member).read()
    assert keys == train_keys
    for key, png in found.items():
        index = int(key[5:])
        reference = F.interpolate(torch.tensor(digits.images[index] / 16.0, dtype=torch.float32)[None, None],
                                  size=(32, 32), mode="bilinear", align_corners=False)
        reference = (reference.clamp(0, 1) * 255).round().to(torch.uint8)[0, 0].numpy()
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        assert pixels.shape == (32, 32, 3) and all(np.array_equal(pixels[..., c], reference) for c in range(3))


def test_rerun_is_a_no_op_and_other_options_are_refused(digits_dir, capsys):
    from ssl_vil.data.make_shards import main

    before = {p.name: p.stat().st_mtime_ns for p in digits_dir.iterdir()}
    assert main(["builtin:digits", str(digits_dir), "--split", "val", "--maxcount", "400"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in digits_dir.iterdir()} == before
    assert main(["builtin:digits", str(digits_dir), "--split", "val", "--maxcount", "300"]) == 2
    assert "another source or other options" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in digits_dir.iterdir()} == before


def _image_bytes(seed: int, fmt: str, size=(12, 9)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    files = {
        "cat/x.y.jpg": _image_bytes(1, "JPEG"),
        "cat/x_y.jpg": _image_bytes(2, "JPEG"),  # collides with x.y after sanitising
        "cat/deep/er/Z.JPEG": _image_bytes(3, "JPEG"),
        "dog/a b.png": _image_bytes(4, "PNG"),
        "dog/c.webp": _image_bytes(5, "WEBP"),
        "dog/broken.jpg": b"\xff\xd8 not really a jpeg",
        "dog/notes.txt": b"ignored",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _records(urls):
    out = {}
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def test_image_folder_keys_labels_and_original_bytes(image_folder, tmp_path):
    manifest = make_shards(str(image_folder), tmp_path / "out", maxcount=2, progress=False)
    assert manifest.classes == ["cat", "dog"]
    records = _records(manifest.urls)
    assert manifest.num_samples == 5 == len(records)  # broken.jpg skipped and reported
    assert [s["source"].endswith("broken.jpg") for s in manifest.extra["skipped"]] == [True]
    for key, members in records.items():
        assert "." not in key and set(key) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
        meta = json.loads(members["json"])
        image_ext = next(e for e in members if e not in ("cls", "json"))
        assert members[image_ext] == Path(meta["source"]).read_bytes()  # stored as is, not re-encoded
        assert int(members["cls"]) == ["cat", "dog"].index(meta["class"]) == ["cat", "dog"].index(
            Path(meta["source"]).relative_to(image_folder).parts[0])
    assert sorted(records) == sorted(["cat_x_y", "cat_x_y_1", "cat_deep_er_Z", "dog_a_b", "dog_c"])
    assert {e for m in records.values() for e in m} == {"jpg", "png", "webp", "cls", "json"}


def test_file_list_with_class_names(image_folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{image_folder}/dog/c.webp\tdog\n{image_folder}/cat/x_y.jpg\tcat\n\n"
                       f"{image_folder}/cat/x.y.jpg\tcat\n")
    manifest = make_shards(str(listing), tmp_path / "out", split="val", shuffle_seed=None, progress=False)
    records = _records(manifest.urls)
    assert manifest.classes == ["cat", "dog"] and manifest.num_samples == 3
    assert [int(records[k]["cls"]) for k in records] == [1, 0, 0]  # source order kept without shuffling


def test_interrupted_write_resumes_to_the_same_shards(image_folder, tmp_path, monkeypatch):
    clean = make_shards(str(image_folder), tmp_path / "clean", maxcount=1, progress=False)
    real_write = shard_writer.write_shard
    calls = {"n": 0}

    def dying_write(path, items, classes, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            # Die halfway through the third shard: its temporary must never become a shard.
            def boom():
                raise KeyboardInterrupt("killed")
            return real_write(path, items, classes, verify=kw["verify"], on_item=boom)
        return real_write(path, items, classes, **kw)

    monkeypatch.setattr("ssl_vil.data.make_shards.write_shard", dying_write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        make_shards(str(image_folder), out, maxcount=1, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["folder-train-000000.tar", "folder-train-000001.tar"]
    assert not list(out.glob(".*.tmp-*")) and not (out / "manifest-train.json").exists()
    (out / ".folder-train-000004.tar.tmp-99999").write_bytes(b"half a shard from a killed writer")
    monkeypatch.setattr("ssl_vil.data.make_shards.write_shard", real_write)
    resumed = make_shards(str(image_folder), out, maxcount=1, progress=False)
    assert [(s.file, s.num_samples, s.sha256) for s in resumed.shards] == [
        (s.file, s.num_samples, s.sha256) for s in clean.shards
    ]
    assert not list(out.glob(".*.tmp-*")) and not list(out.glob(".*.plan.json"))
    # A partial output of another plan is refused rather than mixed.
    other = tmp_path / "other"
    other.mkdir()
    (other / "folder-train-000000.tar").write_bytes(b"")
    with pytest.raises(Exception, match="without a manifest or plan; refusing"):
        make_shards(str(image_folder), other, maxcount=1, progress=False)
