"""eval/knn.py end to end: digits shards with a random-init tiny ViL, ImageFolder == shards, torchrun == one
process, and a pretraining run dir == its exported backbone."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
KNN = REPO / "eval" / "knn.py"
TINY = dict(img_size=32, patch_size=4, dim=64, depth=2, mlstm_backend="parallel")


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    """Digits train (1297) / val (500) shards in one directory, shared by the eval tests (make_shards is idempotent)."""
    from ssl_vil.data import make_shards

    root = tmp_path_factory.getbasetemp() / "eval_digits_shards"
    for split in ("train", "val"):
        assert make_shards.main(["builtin:digits", str(root), "--split", split, "--maxcount", "200"]) == 0
    return root


def export_random_vil(out: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny ViL2 written like ``ssl_vil.export``: safetensors + model.json."""
    import timm
    from safetensors.torch import save_file

    import ssl_vil  # noqa: F401

    torch.manual_seed(seed)
    model = timm.create_model("vil2_tiny_patch16_224", num_classes=0, **TINY)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "teacher_backbone.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    info = {"model": "vil2_tiny_patch16_224", "kwargs": TINY, "img_size": 32, "mean": [0.3] * 3, "std": [0.4] * 3,
            "pooling": "bilateral_concat"}
    (out / "model.json").write_text(json.dumps(info))
    return weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run([sys.executable, str(KNN), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_knn_cli_on_digits_shards_random_init(digits_shards, tmp_path):
    weights = export_random_vil(tmp_path / "export")
    out = tmp_path / "knn"
    proc = _run_cli(["--weights", str(weights), "--train-data", str(digits_shards), "--val-data", str(digits_shards),
                     "--k", "10", "20", "200", "5000", "--num-workers", "2", "--batch-size", "128",
                     "--output-dir", str(out)])
    summary = [line for line in proc.stdout.splitlines() if line.startswith("kNN")]
    assert len(summary) == 1, proc.stdout
    res = json.loads((out / "results_knn.json").read_text())
    print(summary[0])  # the exact figures, for the record (pytest -s)
    assert res["n_train"] == 1297 and res["n_val"] == 500
    assert res["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert res["features"]["spec"] == "cls" and res["features"]["dim"] == 128  # [CLS] = concat(first, last)
    assert res["features"]["l2_normalized"] is True and res["features"]["interpolation"] == "bicubic"
    by_k = {r["k"]: r for r in res["results"]}
    assert sorted(by_k) == [10, 20, 200, 5000]
    assert by_k[5000]["k_effective"] == 1297  # capped at the train set
    # Random-init tiny ViL2 on digits: about 71-77 % kNN@20 (reference prototype); a broad sanity band.
    assert 55.0 <= by_k[20]["top1"] <= 90.0, by_k[20]
    assert all(r["top5"] >= r["top1"] for r in res["results"])
    assert set(res["elapsed"]) >= {"load_s", "train_features_s", "val_features_s", "knn_s", "total_s"}


def _image_folder_from_digits(root: Path, n_train: int, n_val: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat((digits.images / 16.0 * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    for split, idx in (("train", range(n_train)), ("val", range(n_train, n_train + n_val))):
        for i in idx:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((32, 32), Image.BILINEAR).save(folder / f"img{i:04d}.png")


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> tuple[Path, Path]:
    """240 train / 70 val digits (< 100 val images on purpose) as an ImageFolder and as shards of the same files."""
    from ssl_vil.data import make_shards

    root = tmp_path_factory.mktemp("small_digits")
    _image_folder_from_digits(root / "folder", n_train=240, n_val=70)
    for split in ("train", "val"):
        assert make_shards.main([str(root / "folder" / split), str(root / "shards"), "--split", split,
                                 "--maxcount", "50", "--no-shuffle"]) == 0
    return root / "folder", root / "shards"


@pytest.mark.slow
def test_imagefolder_equals_shards_and_torchrun_equals_single_process(small_digits, tmp_path):
    from ssl_vil.eval.knn import main

    torch.set_num_threads(1)
    folder, shards = small_digits
    weights = export_random_vil(tmp_path / "export", seed=1)
    common = ["--weights", str(weights), "--k", "1", "10", "20", "--num-workers", "0", "--batch-size", "32"]
    by_folder = main([*common, "--train-data", str(folder / "train"), "--val-data", str(folder / "val")])
    by_shards = main([*common, "--train-data", str(shards), "--val-data", str(shards)])
    assert (by_folder["n_train"], by_folder["n_val"]) == (by_shards["n_train"], by_shards["n_val"]) == (240, 70)
    assert by_folder["results"] == by_shards["results"]

    # Two real processes (gloo): train features stay sharded, neighbours are merged across ranks.
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
         str(KNN), *common, "--train-data", str(shards), "--val-data", str(shards), "--output-dir", str(out)],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = json.loads((out / "results_knn.json").read_text())
    assert distributed["world_size"] == 2
    assert (distributed["n_train"], distributed["n_val"]) == (240, 70)
    assert distributed["results"] == by_shards["results"]


@pytest.mark.slow
def test_run_dir_and_its_export_give_the_same_numbers(digits_shards, small_digits, tmp_path):
    from ssl_vil.eval.knn import main

    torch.set_num_threads(1)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = subprocess.run(
        [sys.executable, "-m", "ssl_vil.train", "--config", str(REPO / "recipes" / "demo_digits.yaml"),
         "--output-dir", str(run), f"data.train={digits_shards}/digits-train-*.tar",
         "schedule.total_steps=2", "schedule.warmup_steps=1", "schedule.freeze_last_layer_steps=1",
         "checkpoint.every_steps=2", "data.num_workers=0", "logging.tensorboard=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    export = subprocess.run([sys.executable, "-m", "ssl_vil.export", str(run)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    _, shards = small_digits
    common = ["--train-data", str(shards), "--val-data", str(shards), "--k", "10", "20", "--num-workers", "0",
              "--batch-size", "64"]
    by_run = main(["--weights", str(run), *common])
    by_export = main(["--weights", str(run / "export" / "teacher_backbone.safetensors"), *common])
    assert by_run["results"] == by_export["results"]
    assert by_run["features"] == by_export["features"]
    assert by_run["weights_source"].endswith("step_00000002")
    # A trained teacher, not a random init: its numbers differ from a fresh random model's.
    by_random = main(["--weights", str(export_random_vil(tmp_path / "random")), *common])
    assert by_random["results"] != by_run["results"]


def test_unreadable_val_record_is_skipped_and_reported(small_digits, tmp_path):
    import shutil
    import tarfile

    from ssl_vil.eval.knn import main

    torch.set_num_threads(1)
    _, shards = small_digits
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    first_val = sorted(broken.glob("*-val-000000.tar"))[0]
    members = []
    with tarfile.open(first_val) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    victim = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(first_val, "w") as tar:
        for m, data in members:
            if m.name == victim:
                data = b"this is not a png"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    weights = export_random_vil(tmp_path / "export")
    res = main(["--weights", str(weights), "--train-data", str(broken), "--val-data", str(broken), "--k", "5",
                "--num-workers", "0", "--batch-size", "32"])
    assert res["n_val"] == 69 and res["skipped_unreadable"] == {"train": 0, "val": 1}
