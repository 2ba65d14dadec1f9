"""Labels are matched by class name between the train (bank) and val (query) data of an evaluation.

A val split lacking a train class is remapped onto the train index (the k-NN CLI then scores it right); a val
split with a class the train data lacks is refused with one line naming that class and both sources. Shard
directories (written by make_shards) and ImageFolder directories behave the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vil.data import make_shards
from ssl_vil.data.errors import DataConfigError
from ssl_vil.data.manifest import class_label_map, read_manifest
from ssl_vil.eval.inputs import open_eval_source
from test_eval_knn_cli import export_random_vil

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cat", "dog"]
PER_CLASS = 3


def _image(c: int, i: int) -> np.ndarray:
    """(32, 32, 3) uint8, distinct for every (class, index): a class-coloured block pattern plus noise."""
    rng = np.random.default_rng(100 * c + i)
    pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    pixels[: 8 * (c + 1), :, c % 3] = 255
    return pixels


def _folder(root: Path, classes: dict[str, list[int]]) -> Path:
    """ImageFolder ``root/<class>/<class>_<i>.png`` holding the images ``_image(CLASSES.index(class), i)``."""
    for name, indices in classes.items():
        (root / name).mkdir(parents=True)
        for i in indices:
            Image.fromarray(_image(CLASSES.index(name), i)).save(root / name / f"{name}_{i}.png")
    return root


def _label_by_key(source) -> dict[str, int]:
    return {k: int(lab) for b in source.batches() for k, lab in zip(b["keys"], b["labels"])}


def _identity(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Train: all four classes. val_missing: copies of train images of ant, cat, dog (no bee). val_extra: ant and
    a class 'eel' the train data lacks. As ImageFolders and as shards in one directory (splits train / val)."""
    root = tmp_path_factory.mktemp("classes")
    train = _folder(root / "train", {name: list(range(PER_CLASS)) for name in CLASSES})
    missing = _folder(root / "val_missing", {"ant": [0, 1], "cat": [0, 2], "dog": [1]})
    extra = root / "val_extra"
    _folder(extra, {"ant": [0]})
    (extra / "eel").mkdir()
    Image.fromarray(_image(0, 7)).save(extra / "eel" / "eel_7.png")
    shards = root / "shards"
    for split, src in (("train", train), ("val", missing)):
        assert make_shards.main([str(src), str(shards), "--split", split, "--maxcount", "4"]) == 0
    extra_shards = root / "extra_shards"
    assert make_shards.main([str(extra), str(extra_shards), "--split", "val"]) == 0
    return {"train": train, "val_missing": missing, "val_extra": extra, "shards": shards,
            "extra_shards": extra_shards}


def test_make_shards_numbers_each_split_by_its_own_folder(data):
    # The premise: written alone, the val split's labels index its own class list, not the train split's.
    assert read_manifest(data["shards"], "train").classes == CLASSES
    assert read_manifest(data["shards"], "val").classes == ["ant", "cat", "dog"]


@pytest.mark.parametrize("val_kind", ["shards", "imagefolder"])
def test_val_missing_a_class_is_remapped_onto_the_train_index(data, val_kind):
    train = open_eval_source(str(data["shards"]), transform=_identity, batch_size=4, split="train")
    val_source = (str(data["shards"]), "val") if val_kind == "shards" else (str(data["val_missing"]), None)
    val = open_eval_source(val_source[0], transform=_identity, batch_size=2, split=val_source[1],
                           classes=train.classes, classes_source="the train shards")
    assert val.classes == CLASSES and val.own_classes == ["ant", "cat", "dog"]
    labels = _label_by_key(val)
    expected = {"ant": 0, "cat": 2, "dog": 3}  # train indices, not the val folder's 0, 1, 2
    assert len(labels) == 5
    for key, label in labels.items():
        name = key.split("/")[0] if val_kind == "imagefolder" else key.split("_")[0]
        assert label == expected[name], key


@pytest.mark.parametrize("val_kind", ["shards", "imagefolder"])
def test_val_with_an_extra_class_is_refused(data, val_kind):
    val = data["extra_shards"] if val_kind == "shards" else data["val_extra"]
    train = open_eval_source(str(data["train"]), transform=_identity, batch_size=4)
    assert train.classes == CLASSES
    with pytest.raises(DataConfigError) as err:
        open_eval_source(str(val), transform=_identity, batch_size=4, classes=train.classes,
                         classes_source=f"train data ({train.description})")
    message = str(err.value)
    assert "'eel'" in message and "'ant'" not in message.split("lacks:")[1].split(";")[0]
    assert str(val) in message and str(data["train"]) in message


def test_names_on_one_side_only_cannot_be_aligned():
    assert class_label_map(["a", "b"], ["a", "b"], reference_source="T", other_source="V") is None
    assert class_label_map([], [], reference_source="T", other_source="V") is None
    assert class_label_map(["a", "b", "c"], ["c", "a"], reference_source="T", other_source="V") == [2, 0]
    with pytest.raises(DataConfigError, match="T names its 2 classes but V names none"):
        class_label_map(["a", "b"], [], reference_source="T", other_source="V")
    with pytest.raises(DataConfigError, match="V has 2 class\\(es\\) that T lacks: 'x', 'y'"):
        class_label_map(["a"], ["x", "a", "y"], reference_source="T", other_source="V")
    with pytest.raises(DataConfigError, match="V: class names repeat \\('a'\\)"):
        class_label_map(["a", "b"], ["a", "a"], reference_source="T", other_source="V")


def _knn_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ssl_vil.eval.knn", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_knn_cli_scores_a_val_split_missing_a_class_exactly(data, tmp_path):
    """Every val image is a copy of a train image, so its nearest neighbour (k=1) is that copy: 100 % exactly
    when val labels are in the train index; numbering val by its own folders would put 'cat' and 'dog' at the
    indices of 'bee' and 'cat' and score 2 of 5 (40 %)."""
    weights = export_random_vil(tmp_path / "export")
    out = tmp_path / "knn"
    proc = _knn_cli("--weights", str(weights), "--train-data", str(data["shards"]), "--val-data", str(data["shards"]),
                    "--k", "1", "--num-workers", "0", "--batch-size", "8", "--device", "cpu",
                    "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results_knn.json").read_text())
    assert (res["n_train"], res["n_val"]) == (12, 5)
    assert res["results"][0]["top1"] == 100.0
    assert res["classes"] == CLASSES and res["val_classes"] == ["ant", "cat", "dog"]

    # The same val images as an ImageFolder against the train shards.
    res_folder = _knn_cli("--weights", str(weights), "--train-data", str(data["shards"]), "--val-data",
                          str(data["val_missing"]), "--k", "1", "--num-workers", "0", "--batch-size", "8",
                          "--device", "cpu", "--output-dir", str(tmp_path / "folder"))
    assert res_folder.returncode == 0, res_folder.stderr[-3000:]
    assert json.loads((tmp_path / "folder" / "results_knn.json").read_text())["results"][0]["top1"] == 100.0


def test_knn_cli_refuses_an_extra_val_class_in_one_line(data, tmp_path):
    weights = export_random_vil(tmp_path / "export")
    proc = _knn_cli("--weights", str(weights), "--train-data", str(data["train"]), "--val-data",
                    str(data["val_extra"]), "--k", "1", "--num-workers", "0", "--device", "cpu")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("eval/knn.py: error: ImageFolder ")
    assert "'eel'" in lines[0] and str(data["val_extra"]) in lines[0] and str(data["train"]) in lines[0]


def _make_shards_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_vil.data.make_shards", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_make_shards_classes_from_indexes_val_by_the_train_list(data, tmp_path):
    out = tmp_path / "shards"
    proc = _make_shards_cli(str(data["val_missing"]), str(out), "--split", "val", "--classes-from",
                            str(data["shards"] / "manifest-train.json"))
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(out, "val")
    assert manifest.classes == CLASSES and manifest.extra["options"]["classes"] == CLASSES
    source = open_eval_source(str(out), transform=_identity, batch_size=4)
    assert {k: lab for k, lab in _label_by_key(source).items()} == {
        "ant_ant_0": 0, "ant_ant_1": 0, "cat_cat_0": 2, "cat_cat_2": 2, "dog_dog_1": 3}
    # Written without --classes-from into the same directory: another plan, refused rather than mixed.
    again = _make_shards_cli(str(data["val_missing"]), str(out), "--split", "val")
    assert again.returncode == 2 and "made from another source or other options" in again.stderr

    refused = _make_shards_cli(str(data["val_extra"]), str(tmp_path / "other"), "--split", "val", "--classes-from",
                               str(data["train"]))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.count("\n") == 1 and "'eel'" in refused.stderr and str(data["train"]) in refused.stderr
