"""Pretraining data where users keep it: shards served over HTTP, an image folder, one split of a shard dir.

Trainer runs are real subprocesses (tests/trainer_harness.py) whose key logs record the sample keys of every step;
remote shards come from a real HTTP server on 127.0.0.1 (read by webdataset's gopen, i.e. curl).
"""

from __future__ import annotations

import collections
import functools
import http.server
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from faultinject import read_key_log
from ssl_vil.data import DataConfigError, DataErrorBudgetExceeded, build_train_stream
from synthetic_shards import encode_png, synthetic_image, synthetic_key, write_synthetic_shards
from trainer_harness import RECIPE, ROOT, launch, logs, losses, run_training, tiny_overrides, wait_all

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

SIZES = [10, 10, 10, 10]  # 40 samples: 5 steps of 8 per epoch, no padding
SHARD_KEYS = {synthetic_key("syn", s, i) for s, n in enumerate(SIZES) for i in range(n)}
CLASSES, PER_CLASS = 4, 10
FOLDER_KEYS = {f"class{c}/img{i:02d}" for c in range(CLASSES) for i in range(PER_CLASS)}
STEPS, STEPS_PER_EPOCH = 12, 5


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (the base class's signature)
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """(root, its http:// URL): root/shards holds 4 shards with sidecars, root/folder an ImageFolder of PNGs."""
    root = tmp_path_factory.mktemp("sources")
    write_synthetic_shards(root / "shards", SIZES, image_size=32)
    for c in range(CLASSES):
        (root / "folder" / f"class{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            png = encode_png(synthetic_image(1_000_000 + c * 100 + i, 32))
            (root / "folder" / f"class{c}" / f"img{i:02d}.png").write_bytes(png)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _overrides(data: str | Path, workers: int) -> list[str]:
    # tiny_overrides only formats data.train=<data>, so a URL passes through unchanged.
    return tiny_overrides(data, total_steps=STEPS, workers=workers) + ["checkpoint.every_steps=3"]


def _train(run: Path, data: str | Path, workers: int) -> dict[int, list[str]]:
    assert run_training(run, _overrides(data, workers)) == [0], logs(run)
    return read_key_log(run / "keys" / "rank0.jsonl")


def _assert_exactly_once_per_epoch(keylog: dict[int, list[str]], expected: set[str]) -> None:
    assert sorted(keylog) == list(range(1, STEPS + 1))
    for epoch in range(STEPS // STEPS_PER_EPOCH):
        steps = range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
        seen = collections.Counter(k for s in steps for k in keylog[s])
        assert set(seen) == expected and max(seen.values()) == 1, f"epoch {epoch}"


def _kill_and_resume(run: Path, data: str | Path, workers: int) -> None:
    """Killed mid-step 8; the last checkpoint is step 6, one step into the second epoch."""
    procs = launch(run, _overrides(data, workers), fault="kill:step=8,rank=0,at=mid_step")
    assert wait_all(procs) == [-signal.SIGKILL], logs(run)
    assert wait_all(launch(run, _overrides(data, workers))) == [0], logs(run)
    assert '"event": "resumed"' in (run / "metrics.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_http_shards_train_like_local_ones_and_resume(served, tmp_path):
    root, url = served
    local = _train(tmp_path / "local", root / "shards", 0)
    _assert_exactly_once_per_epoch(local, SHARD_KEYS)
    for workers in (0, 2):
        remote = _train(tmp_path / f"http_w{workers}", f"{url}/shards/", workers)
        assert remote == local, f"{workers} workers"
        assert losses(tmp_path / f"http_w{workers}") == losses(tmp_path / "local")
    _kill_and_resume(tmp_path / "http_resumed", f"{url}/shards/", 2)
    assert read_key_log(tmp_path / "http_resumed" / "keys" / "rank0.jsonl") == local
    assert losses(tmp_path / "http_resumed") == losses(tmp_path / "local")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_image_folder_trains_every_file_once_per_epoch_and_resumes(served, tmp_path):
    root, _ = served
    reference = _train(tmp_path / "folder_w0", root / "folder", 0)
    _assert_exactly_once_per_epoch(reference, FOLDER_KEYS)
    assert _train(tmp_path / "folder_w2", root / "folder", 2) == reference
    assert losses(tmp_path / "folder_w2") == losses(tmp_path / "folder_w0")
    _kill_and_resume(tmp_path / "folder_resumed", root / "folder", 2)
    assert read_key_log(tmp_path / "folder_resumed" / "keys" / "rank0.jsonl") == reference
    assert losses(tmp_path / "folder_resumed") == losses(tmp_path / "folder_w0")


# -- in-process stream checks --------------------------------------------------------------------------------


def _pixels(image, generator):
    return [torch.from_numpy(np.array(image)).permute(2, 0, 1).float() * torch.rand((), generator=generator)]


def _epoch(spec: str | Path, **kw) -> tuple[list[tuple[list[str], list[bool]]], object]:
    args = dict(batch_size=4, seed=5, rank=0, world_size=1, num_workers=0, transform=_pixels,
                shuffle_window_samples=8)
    args.update(kw)
    stream = build_train_stream(spec, **args)
    return [(b["keys"], b["padded"].tolist()) for b in stream], stream


def test_http_brace_list_reads_sizes_json_beside_the_shards(served):
    root, url = served
    local, _ = _epoch(root / "shards")
    remote, stream = _epoch(f"{url}/shards/syn-train-{{000000..000003}}.tar", num_workers=2)
    assert remote == local
    assert stream.classes == tuple(str(c) for c in range(10))  # from the manifest served beside the shards


def test_remote_shards_without_sidecars_name_what_is_expected(served):
    root, url = served
    bare = root / "bare"
    bare.mkdir(exist_ok=True)
    (bare / "syn-train-000000.tar").write_bytes((root / "shards" / "syn-train-000000.tar").read_bytes())
    with pytest.raises(DataConfigError) as info:
        _epoch(f"{url}/bare/syn-train-{{000000..000000}}.tar")
    assert info.value.key == "shard_sizes" and "sizes.json" in str(info.value) and "404" in str(info.value)
    spec = f"pipe:cat {root}/shards/syn-train-{{000000..000003}}.tar"
    with pytest.raises(DataConfigError) as info:
        _epoch(spec, allow_pipe=True)
    assert info.value.key == "shard_sizes" and "data.shard_sizes" in str(info.value)


def test_http_without_curl_is_one_clear_error(served, tmp_path, monkeypatch):
    _, url = served
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no curl on PATH
    with pytest.raises(DataConfigError, match=r"`curl` command, which is not on PATH") as info:
        _epoch(f"{url}/shards/")
    assert info.value.key == "train"


def test_corrupt_image_file_is_counted_and_padded(tmp_path):
    folder = tmp_path / "folder"
    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(5):
            (folder / f"c{c}" / f"x{i}.png").write_bytes(encode_png(synthetic_image(c * 10 + i, 16)))
    (folder / "c1" / "broken.png").write_bytes(b"\x89PNG not really")
    batches, stream = _epoch(folder, error_budget_fraction=None)
    keys = [k for ks, pads in batches for k, p in zip(ks, pads) if not p]
    assert sorted(keys) == sorted(f"c{c}/x{i}" for c in range(2) for i in range(5))
    assert sum(p for _, pads in batches for p in pads) == 3 * 4 - 10  # the lost file and the epoch's padding
    assert stream.error_totals["undecodable_image"] == 1 and stream.error_totals["lost_samples"] == 1
    with pytest.raises(DataErrorBudgetExceeded, match=r"broken\.png"):  # the budget names the bad file
        _epoch(folder, error_budget_fraction=0.0)


def _two_split_dir(out: Path, names: tuple[str, str] = ("train", "val")) -> Path:
    write_synthetic_shards(out, [6, 6], prefix="tr", split=names[0])
    write_synthetic_shards(out, [5, 5], prefix="va", split=names[1])
    return out


def test_split_picks_the_manifest_local_and_remote(served, tmp_path):
    root, url = served
    shards = _two_split_dir(root / "two")
    train = {synthetic_key("tr", s, i) for s in range(2) for i in range(6)}
    val = {synthetic_key("va", s, i) for s in range(2) for i in range(5)}
    for spec in (shards, f"{url}/two/"):
        got = {k for ks, pads in _epoch(spec)[0] for k, p in zip(ks, pads) if not p}
        assert got == train, spec  # default: the train split
        got = {k for ks, pads in _epoch(spec, split="val")[0] for k, p in zip(ks, pads) if not p}
        assert got == val, spec
        with pytest.raises(DataConfigError, match="train, val") as info:
            _epoch(spec, split="test")
        assert info.value.key == "split"
    other = _two_split_dir(tmp_path / "ab", ("a", "b"))
    with pytest.raises(DataConfigError, match="holds the splits a, b") as info:
        _epoch(other)
    assert info.value.key == "split"


def test_trainer_refuses_a_missing_split_in_one_line(served, tmp_path):
    root, _ = served
    shards = _two_split_dir(root / "two_cli")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_vil.train", "--config", str(RECIPE), "--output-dir", str(run),
         *_overrides(shards, 0), "data.split=test"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    line = next(l for l in proc.stderr.splitlines() if l.startswith("config error"))
    assert "data.split:" in line and "train, val" in line and "manifest-test.json" in line


def test_split_sizes_an_epoch_schedule(served):
    from ssl_vil.config import load_config

    root, url = served
    shards = _two_split_dir(root / "two_epochs")
    for spec in (str(shards), f"{url}/two_epochs/"):
        cfg = load_config(overrides=["optim.global_batch_size=4", "schedule.total_epochs=2", f"data.train={spec}",
                                     "data.split=val"])
        assert cfg.derived.samples_per_epoch == 10 and cfg.derived.total_steps == 5


def test_pipe_shards_sized_by_the_shard_sizes_key(served):
    from ssl_vil.config.schema import DataConfig
    from ssl_vil.train.data import train_data

    root, url = served
    spec = f"pipe:cat {root}/shards/syn-train-{{000000..000003}}.tar"
    for sizes in (root / "shards" / "sizes.json", f"{url}/shards/manifest-train.json"):
        shards = train_data(DataConfig(train=spec, allow_pipe=True, shard_sizes=str(sizes)))
        assert shards.counts == tuple(SIZES)
    with pytest.raises(DataConfigError, match=r"^data\.shard_sizes: cannot read .*missing\.json"):
        train_data(DataConfig(train=spec, allow_pipe=True, shard_sizes=str(root / "missing.json")))


def test_flat_image_folder_without_labels(tmp_path):
    for i in range(6):
        (tmp_path / f"p{i}.png").write_bytes(encode_png(synthetic_image(500 + i, 16)))
    (tmp_path / "p0.bmp").write_bytes(encode_png(synthetic_image(600, 16)))  # same stem: both keep the extension
    stream = build_train_stream(tmp_path, batch_size=7, seed=1, rank=0, world_size=1, num_workers=0,
                                transform=_pixels, shuffle_window_samples=8)
    (batch,) = list(stream)
    assert sorted(batch["keys"]) == ["p0.bmp", "p0.png", "p1", "p2", "p3", "p4", "p5"]
    assert batch["labels"].tolist() == [-1] * 7 and stream.classes == ()
