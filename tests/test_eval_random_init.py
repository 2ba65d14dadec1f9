"""The random-init k-NN baseline as a public command: ``eval/knn.py --weights random:SPEC --init-seed N``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vil.config import load_config, to_yaml
from ssl_vil.eval.weights_id import random_init_backbone

REPO = Path(__file__).resolve().parents[1]
KNN = REPO / "eval" / "knn.py"
RECIPE = REPO / "recipes" / "demo_digits.yaml"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """240 train / 70 val digits as train / val ImageFolders (32 px)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("random_init_digits")
    data = load_digits()
    images = (data.images / 16 * 255).round().astype(np.uint8)
    for split, idx in (("train", range(240)), ("val", range(240, 310))):
        for i in idx:
            folder = root / split / str(data.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert("RGB").resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root / "train", root / "val"


def run_knn_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KNN), *args], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


def seeded_export_sha256(out: Path, seed: int) -> str:
    """What the demo used to do privately: seed, build the recipe's backbone, save it as a file; its hash."""
    from safetensors.torch import save_file

    from ssl_vil.export import build_backbone, model_info

    torch.manual_seed(seed)
    model = build_backbone(model_info(load_config(RECIPE, world_size=1)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_cli_baseline_equals_the_demo_number(digits, tmp_path):
    from ssl_vil.demo import knn_args, random_init_knn20

    train, val = digits
    # A run dir only needs its config.yaml to name the architecture (the demo passes its run dir).
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(load_config(RECIPE, world_size=1)))
    demo_top1 = random_init_knn20(run_dir, train, val, tmp_path / "demo", seed=0)

    proc = run_knn_cli(knn_args(f"random:{RECIPE}", train, val, tmp_path / "cli", "--init-seed", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads((tmp_path / "cli" / "results_knn.json").read_text())
    demo = json.loads((tmp_path / "demo" / "results_knn.json").read_text())
    print(cli["summary"])
    assert next(r["top1"] for r in cli["results"] if r["k"] == 20) == demo_top1
    assert cli["results"] == demo["results"] and (cli["n_train"], cli["n_val"]) == (240, 70)
    # The same tensors as a seeded build saved to a file (the demo's former private baseline).
    assert cli["weights_sha256"] == demo["weights_sha256"] == seeded_export_sha256(tmp_path / "w.safetensors", 0)
    assert cli["weights"] == f"random:{RECIPE}" and cli["weights_source"] == f"random:{RECIPE} (init seed 0)"
    assert cli["model"] == "vil2_tiny_patch16_224" and cli["features"]["img_size"] == 32
    # A random ViL2 on digits is far above chance (10 %) yet not a trained model.
    assert 30.0 < demo_top1 < 95.0


def test_seed_and_spec_forms(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    net0, info0 = random_init_backbone(f"random:{RECIPE}", 0)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is untouched
    net1, info1 = random_init_backbone(f"random:{RECIPE}", 1)
    assert info0["weights_sha256"] != info1["weights_sha256"] and info1["init_seed"] == 1
    # model.json of an export names the same architecture: same init, same hash.
    (tmp_path / "model.json").write_text(json.dumps({k: v for k, v in info0.items()
                                                     if k not in ("source", "init_seed", "weights_sha256")}))
    _, from_json = random_init_backbone(f"random:{tmp_path / 'model.json'}", 0)
    assert from_json["weights_sha256"] == info0["weights_sha256"]
    sd0, sd_json = net0.state_dict(), _.state_dict()
    assert all(torch.equal(sd0[k], sd_json[k]) for k in sd0)
    # A bare timm name uses its default constructor arguments.
    _, named = random_init_backbone("random:vil2_tiny_patch16_224", 0)
    assert (named["model"], named["kwargs"], named["img_size"]) == ("vil2_tiny_patch16_224", {}, 224)


@pytest.mark.parametrize("spec", ["random:no/such/recipe.yaml", "random:not_a_model_name", "random:"])
def test_bad_random_spec_is_one_clear_line(digits, spec, tmp_path):
    train, val = digits
    proc = run_knn_cli(["--weights", spec, "--train-data", str(train), "--val-data", str(val),
                        "--num-workers", "0", "--output-dir", str(tmp_path)])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"eval/knn.py: error: weights: got {spec!r}, expected random:SPEC with SPEC a recipe")
    assert not (tmp_path / "results_knn.json").exists()


def numpy_pixel_knn20(train: Path, val: Path, mean: list[float], std: list[float]) -> float:
    """kNN@20 top-1 (%) of the normalised pixels, written out in numpy: cosine similarity, votes exp(sim / 0.07)."""
    def load(root: Path) -> tuple[np.ndarray, np.ndarray]:
        files = sorted(root.glob("*/*.png"))
        x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) / 255 for f in files])
        x = ((x - np.array(mean)) / np.array(std)).transpose(0, 3, 1, 2).reshape(len(files), -1)
        return x / np.linalg.norm(x, axis=1, keepdims=True), np.array([int(f.parent.name) for f in files])

    (xt, yt), (xv, yv) = load(train), load(val)
    sim = xv @ xt.T
    nn_idx = np.argsort(-sim, axis=1)[:, :20]
    votes = np.zeros((len(xv), 10))
    for i, row in enumerate(nn_idx):
        np.add.at(votes[i], yt[row], np.exp(sim[i, row] / 0.07))
    return float((votes.argmax(1) == yv).mean() * 100)


def test_pixel_baseline_is_the_input_under_the_same_protocol(digits, tmp_path):
    train, val = digits
    # crop 1.0 at the recipe's 32 px on 32 px images: the transform is only the normalisation.
    proc = run_knn_cli(["--weights", f"pixels:{RECIPE}", "--train-data", str(train), "--val-data", str(val),
                        "--k", "20", "--crop-pct", "1.0", "--num-workers", "0", "--output-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results_knn.json").read_text())
    cfg = load_config(RECIPE, world_size=1).data.augment
    expected = numpy_pixel_knn20(train, val, list(cfg.mean), list(cfg.std))
    assert res["results"][0]["top1"] == pytest.approx(expected, abs=1e-9)
    assert res["features"]["dim"] == 3 * 32 * 32 and res["features"]["spec"] == "pixels"
    assert res["weights_sha256"] is None and res["weights"] == f"pixels:{RECIPE}"
    assert "kNN (input pixels" in proc.stdout
    assert 80.0 < expected < 100.0  # digits are nearly separable in pixel space
