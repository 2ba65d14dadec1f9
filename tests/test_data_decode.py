"""Decoding to RGB (CMYK, gray, palette, 16-bit, alpha), bomb guard, and typed tar-reader failures."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from ssl_vil.data.decode import SampleIssue, decode_image, decode_label, to_rgb
from ssl_vil.data.tar_records import ShardRecordReader, split_member_name


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _decode(data: bytes, max_pixels: int = 10**8) -> np.ndarray:
    image = decode_image(data, url="u", record=0, key="k", max_pixels=max_pixels)
    assert image.mode == "RGB"
    return np.asarray(image)


RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (6, 5), dtype=np.uint8)


def test_grayscale_and_one_bit_replicate_the_channel():
    out = _decode(_encode(Image.fromarray(GRAY, "L"), "PNG"))
    assert out.shape == (6, 5, 3) and all(np.array_equal(out[..., c], GRAY) for c in range(3))
    bits = GRAY > 127
    out = _decode(_encode(Image.fromarray(bits), "PNG"))
    assert np.array_equal(out[..., 1], np.where(bits, 255, 0))


def test_sixteen_bit_is_rescaled_not_clipped():
    values = (GRAY.astype(np.uint16) * 257)  # full 16-bit range
    image = Image.fromarray(values.astype(np.uint16))
    assert image.mode.startswith("I;16")
    out = _decode(_encode(image, "PNG"))
    assert np.array_equal(out[..., 0], GRAY)  # (v * 257) >> 8 == v
    # PIL's own conversion would saturate almost everything at 255.
    assert (np.asarray(Image.open(io.BytesIO(_encode(image, "PNG"))).convert("RGB"))[..., 0] == 255).mean() > 0.9


def test_palette_with_and_without_transparency():
    palette_image = Image.fromarray(GRAY % 4, "P")
    colours = [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9]
    palette_image.putpalette(colours + [0] * (768 - len(colours)))
    out = _decode(_encode(palette_image, "PNG"))
    expected = np.array(colours, dtype=np.uint8).reshape(4, 3)[GRAY % 4]
    assert np.array_equal(out, expected)
    out = _decode(_encode(palette_image, "PNG", transparency=0))
    assert np.array_equal(out[(GRAY % 4) == 0], np.zeros(((GRAY % 4) == 0).sum() * 3, np.uint8).reshape(-1, 3))
    assert np.array_equal(out[(GRAY % 4) == 1], np.tile([0, 255, 0], (((GRAY % 4) == 1).sum(), 1)))


def test_cmyk_jpeg_and_rgba_png():
    rgb = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = _decode(data)
    assert np.array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    alpha = np.where(GRAY > 100, 255, 0).astype(np.uint8)
    rgba = np.dstack([np.stack([GRAY] * 3, -1), alpha])
    out = _decode(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.array_equal(out[..., 0], np.where(alpha == 255, GRAY, 0))


def test_to_rgb_keeps_rgb_object():
    image = Image.new("RGB", (3, 3))
    assert to_rgb(image) is image


def test_oversized_and_bomb_and_undecodable_are_typed():
    with pytest.raises(SampleIssue) as info:
        _decode(_encode(Image.new("RGB", (40, 30)), "PNG"), max_pixels=40 * 30 - 1)
    assert info.value.issue.category == "oversized_image" and "40x30 = 1200 pixels" in str(info.value)
    # A real decompression bomb: 20000 x 20000 1-bit pixels in a few kB; PIL's own guard trips on open.
    bomb = _encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(SampleIssue) as info:
        _decode(bomb)
    assert info.value.issue.category == "oversized_image"
    jpeg = _encode(Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "JPEG")
    for bad in (b"not an image at all", jpeg[: len(jpeg) // 3]):
        with pytest.raises(SampleIssue) as info:
            decode_image(bad, url="shard.tar", record=4, key="abc", max_pixels=10**8)
        issue = info.value.issue
        assert (issue.category, issue.url, issue.record, issue.key) == ("undecodable_image", "shard.tar", 4, "abc")


def test_labels():
    assert decode_label({"cls": b" 7\n"}, url="u", record=0, key="k") == 7
    assert decode_label({}, url="u", record=0, key="k") == -1
    with pytest.raises(SampleIssue, match="bad_label"):
        decode_label({"cls": b"seven"}, url="u", record=0, key="k")


def test_split_member_name_follows_webdataset():
    assert split_member_name("a/b.c.jpg") == ("a/b", "c.jpg")
    assert split_member_name("img.v2.000003.jpg") == ("img", "v2.000003.jpg")
    assert split_member_name("n01_10026.JPEG") == ("n01_10026", "JPEG")


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


PNG = _encode(Image.new("RGB", (2, 2)), "PNG")


@pytest.mark.parametrize("via_pipe", [False, True])
def test_reader_records_skip_duplicates_and_counts(tmp_path, via_pipe):
    members = []
    for i in range(6):
        members += [(f"k{i}.png", PNG), (f"k{i}.cls", str(i).encode())]
    members += [("k1.png", PNG)]  # key reused -> a 7th record, duplicate
    members += [("k7.png", PNG), ("k7.png", PNG)]  # same member name twice -> two records, the 2nd a duplicate
    members += [("odd.v2.jpg", PNG), ("nolabel.cls", b"1")]  # image extension "v2.jpg" -> missing image
    path = _tar(tmp_path / "s.tar", members)
    url = f"pipe:cat {path}" if via_pipe else path
    reader = ShardRecordReader(url, expected=11)
    head = reader.read(0, 2)
    assert [(r.index, r.key, sorted(r.members)) for r in head] == [(0, "k0", ["cls", "png"]), (1, "k1", ["cls", "png"])]
    tail = reader.read(5, 11)  # skips records 2..4
    assert [r.index for r in tail] == list(range(5, 11))
    kinds = [(r.key, r.error.category if r.error else None) for r in tail]
    assert kinds == [("k5", None), ("k1", "duplicate_key"), ("k7", None), ("k7", "duplicate_key"),
                     ("odd", "missing_image"), ("nolabel", "missing_image")]
    assert all(r.members is None for r in tail if r.error)
    with pytest.raises(ValueError, match="cannot go back"):
        reader.read(3, 4)
    reader.close()
    with ShardRecordReader(url, expected=None) as counter:
        assert counter.count_all()[0] == 11


def test_reader_shard_level_failures(tmp_path):
    members = [(f"k{i}.png", PNG) for i in range(5)]
    path = _tar(tmp_path / "t.tar", members)
    # More records than the manifest says: the surplus is reported on the last planned record.
    records = ShardRecordReader(path, expected=3).read(0, 3)
    assert [e.category for e in records[2].events] == ["extra_records"] and records[2].error is None
    # Fewer: truncated at record 5, counted once there; every later position is a hole.
    reader = ShardRecordReader(path, expected=7)
    records = reader.read(0, 7)
    assert [r.error.category if r.error else None for r in records] == [None] * 5 + ["truncated_shard"] * 2
    assert [len(r.events) for r in records] == [0] * 5 + [1, 0]
    # Cut inside record 2's bytes: records 0-1 good, record 2 carries the failure with its key.
    with tarfile.open(path) as tar:
        cut = tar.getmember("k2.png").offset_data + 10
    data = open(path, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    records = ShardRecordReader(str(tmp_path / "cut.tar"), expected=5).read(0, 5)
    assert [r.error.category if r.error else None for r in records] == [None, None] + ["truncated_shard"] * 3
    assert records[2].events[0].key == "k2"
    (tmp_path / "zero.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(b"x" * 2000)
    for name, category in (("zero.tar", "empty_shard"), ("junk.tar", "unreadable_shard"),
                           ("missing.tar", "unreadable_shard")):
        records = ShardRecordReader(str(tmp_path / name), expected=2).read(1, 2)  # skipping still sees it
        assert records[0].error.category == category and records[0].events == ()
        first = ShardRecordReader(str(tmp_path / name), expected=2).read(0, 1)
        assert first[0].events[0].category == category


@pytest.mark.parametrize("via_pipe", [False, True])
def test_truncation_is_attributed_to_one_record_by_every_reader(tmp_path, via_pipe):
    """Readers starting anywhere agree on the failing record, so the failure is counted exactly once."""
    members = []
    for i in range(8):
        members += [(f"k{i}.png", PNG * 20), (f"k{i}.cls", b"1")]
    path = _tar(tmp_path / "t.tar", members)
    with tarfile.open(path) as tar:
        cuts = {
            "inside k3 image": tar.getmember("k3.png").offset_data + 30,
            "inside k3 label header": tar.getmember("k3.cls").offset + 100,
            "after k3, inside k4 header": tar.getmember("k4.png").offset + 100,
        }
        k4_data = tar.getmember("k4.png").offset_data + 30
    data = open(path, "rb").read()
    for what, cut in cuts.items():
        cut_path = tmp_path / "cut.tar"
        cut_path.write_bytes(data[:cut])
        url = f"pipe:cat {cut_path}" if via_pipe else str(cut_path)
        owners = set()
        for start in range(8):
            for rec in ShardRecordReader(url, expected=8).read(start, 8):
                assert rec.index >= start
                owners.update(rec.index for e in rec.events if e.category == "truncated_shard")
        # A cut header is charged to the record being read when it was met (it may have been its member).
        assert owners == {3}, what
    cut_path.write_bytes(data[:k4_data])  # inside k4's image bytes: k3 is whole, k4 fails
    url = f"pipe:cat {cut_path}" if via_pipe else str(cut_path)
    owners = set()
    for start in range(8):
        for rec in ShardRecordReader(url, expected=8).read(start, 8):
            owners.update(rec.index for e in rec.events if e.category == "truncated_shard")
    assert owners == {4}
