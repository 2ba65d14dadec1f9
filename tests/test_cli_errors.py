"""User mistakes and hostile files, across every command: one message naming what was wrong, no traceback.

Each case runs the real command in a subprocess: it must exit with a non-zero status, print no Python traceback,
and its stderr must name the file / key / option at fault and what was expected. ``SSL_VIL_DEBUG=1`` brings the
traceback back. No case trains: every mistake is refused before that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "demo_digits.yaml")
FT_RECIPE = str(REPO / "recipes" / "finetune_digits.yaml")

TRAIN = ["-m", "ssl_vil.train"]
KNN = ["-m", "ssl_vil.eval.knn"]
LINEAR = ["-m", "ssl_vil.eval.linear"]
FINETUNE = ["-m", "ssl_vil.eval.finetune"]
EXPORT = ["-m", "ssl_vil.export"]
REPORT = ["-m", "ssl_vil.report"]
SHARDS = ["-m", "ssl_vil.data.make_shards"]
DEMO = ["-m", "ssl_vil.demo"]
SUBMIT = [str(REPO / "cluster" / "submit.py")]


# ------------------------------------------------------------------------------------------ files the cases use
def _png(path: Path, value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def _image_folder(*classes: str) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        for i, name in enumerate(classes):
            for j in range(2):
                _png(root / name / f"{j}.png", 40 * i + j)
    return make


def _pickle_with_global(path: Path) -> None:
    """A torch file whose pickle holds an object that ``weights_only=True`` refuses (argparse.Namespace)."""
    import argparse

    import torch

    torch.save({"state": argparse.Namespace(x=1)}, path)


def _run_dir_without_checkpoints(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(Path(RECIPE).read_text())


def _metrics_run(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")


def _finished_shards(path: Path) -> None:
    """OUT holds a complete 'train' split made from a 2-class folder (the case then writes another source)."""
    from ssl_vil.data.make_shards import main

    src = path.parent / "src_a"
    _image_folder("a", "b")(src)
    assert main([str(src), str(path), "--split", "train", "--maxcount", "10"]) == 0


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True)


FileSpec = str | bytes | Callable[[Path], None]

# (id, command, argv with {tmp} for the case's directory, files to create under {tmp}, expected stderr fragment(s))
CASES: list[tuple[str, list[str], list[str], dict[str, FileSpec], str | tuple[str, ...]]] = [
    # ---- python -m ssl_vil.train
    ("train-typo-key", TRAIN, ["--config", RECIPE, "--output-dir", "{tmp}/run", "optim.lrr=0.1"], {},
     "optim.lrr: unknown key; did you mean optim.lr?"),
    ("train-wrong-type", TRAIN, ["--config", RECIPE, "--output-dir", "{tmp}/run", "optim.lr=fast"], {},
     "optim.lr: got 'fast', expected float"),
    ("train-override-without-value", TRAIN, ["--config", RECIPE, "--output-dir", "{tmp}/run", "optim.lr"], {},
     "override 'optim.lr': expected key.sub=value"),
    ("train-missing-recipe", TRAIN, ["--config", "{tmp}/nope.yaml", "--output-dir", "{tmp}/run"], {},
     "nope.yaml': not found"),
    ("train-recipe-not-yaml", TRAIN, ["--config", "{tmp}/bad.yaml", "--output-dir", "{tmp}/run"],
     {"bad.yaml": "optim: {lr: [1, 2\n"}, "bad.yaml"),
    ("train-recipe-is-a-list", TRAIN, ["--config", "{tmp}/list.yaml", "--output-dir", "{tmp}/run"],
     {"list.yaml": "- 1\n- 2\n"}, "list.yaml': expected a mapping at top level, got list"),
    ("train-output-under-a-file", TRAIN, ["--config", RECIPE, "--output-dir", "{tmp}/afile/run"],
     {"afile": "x"}, "afile is not a directory"),
    ("train-data-missing", TRAIN, ["--config", RECIPE, "--output-dir", "{tmp}/run", "data.train={tmp}/nodata"], {},
     "nodata"),
    ("train-data-is-a-file", TRAIN, ["--config", RECIPE, "--output-dir", "{tmp}/run", "data.train={tmp}/f.txt"],
     {"f.txt": "hello"}, "f.txt"),
    ("train-shard-dir-without-shards", TRAIN,
     ["--config", RECIPE, "--output-dir", "{tmp}/run", "data.train={tmp}/empty"], {"empty": _mkdir}, "empty"),
    ("train-tar-that-is-not-a-tar", TRAIN,
     ["--config", RECIPE, "--output-dir", "{tmp}/run", "data.train={tmp}/shards/x-000000.tar"],
     {"shards/x-000000.tar": b"this is not a tar archive" * 40}, "x-000000.tar"),
    ("train-pipe-url", TRAIN, ["--config", RECIPE, "--output-dir", "{tmp}/run", "data.train=pipe:cat x.tar"], {},
     "data.allow_pipe=true"),
    # ---- eval/knn.py
    ("knn-weights-missing", KNN, ["--weights", "{tmp}/nope.pt", "--train-data", "{tmp}/d", "--val-data", "{tmp}/d"],
     {"d": _image_folder("a")}, "nope.pt: expected a run dir, a checkpoint folder or a weights file"),
    ("knn-weights-garbage", KNN, ["--weights", "{tmp}/garbage.pt", "--model", "vil2_tiny_patch16_224",
                                  "--train-data", "{tmp}/d", "--val-data", "{tmp}/d"],
     {"garbage.pt": b"\x00\x01garbage" * 100, "d": _image_folder("a")},
     ("garbage.pt: cannot be read with torch.load", "expected a plain tensor dict")),
    ("knn-safetensors-that-is-text", KNN, ["--weights", "{tmp}/fake.safetensors", "--train-data", "{tmp}/d",
                                           "--val-data", "{tmp}/d"],
     {"fake.safetensors": "just some text, not tensors\n" * 20, "d": _image_folder("a")},
     "fake.safetensors: not a readable safetensors file"),
    ("knn-safetensors-text-with-model", KNN, ["--weights", "{tmp}/fake.safetensors", "--model",
                                              "vil2_tiny_patch16_224", "--train-data", "{tmp}/d", "--val-data",
                                              "{tmp}/d"],
     {"fake.safetensors": "just some text, not tensors\n" * 20, "d": _image_folder("a")},
     "fake.safetensors: not a readable safetensors file"),
    ("knn-pickle-with-foreign-global", KNN, ["--weights", "{tmp}/evil.pt", "--model", "vil2_tiny_patch16_224",
                                             "--train-data", "{tmp}/d", "--val-data", "{tmp}/d"],
     {"evil.pt": _pickle_with_global, "d": _image_folder("a")}, ("evil.pt: cannot be read", "Unsupported global: GLOBAL argparse.Namespace")),
    ("knn-bare-weights-without-model", KNN, ["--weights", "{tmp}/w.pt", "--train-data", "{tmp}/d",
                                             "--val-data", "{tmp}/d"],
     {"w.pt": b"x", "d": _image_folder("a")}, "--model"),
    ("knn-run-dir-without-checkpoints", KNN, ["--weights", "{tmp}/run", "--train-data", "{tmp}/d",
                                              "--val-data", "{tmp}/d"],
     {"run": _run_dir_without_checkpoints, "d": _image_folder("a")}, "no valid checkpoint"),
    ("knn-k-zero", KNN, ["--weights", "x", "--train-data", "d", "--val-data", "d", "--k", "0"], {},
     "k: got [0], expected neighbour counts >= 1"),
    ("knn-crop-pct-2", KNN, ["--weights", "x", "--train-data", "d", "--val-data", "d", "--crop-pct", "2"], {},
     "crop_pct: got 2.0, expected a fraction in (0, 1]"),
    ("knn-batch-size-negative", KNN, ["--weights", "x", "--train-data", "d", "--val-data", "d",
                                      "--batch-size", "-1"], {}, "batch_size: got -1"),
    ("knn-unknown-features", KNN, ["--weights", "x", "--train-data", "d", "--val-data", "d", "--features", "max"],
     {}, "--features: invalid choice: 'max'"),
    ("knn-pipe-url", KNN, ["--weights", "x", "--train-data", "pipe:cat a.tar", "--val-data", "d"], {},
     "pipe: URLs (shell commands) are not supported"),
    ("knn-val-class-train-lacks", KNN, ["--weights", f"random:{RECIPE}", "--train-data", "{tmp}/train",
                                        "--val-data", "{tmp}/val", "--num-workers", "0", "--device", "cpu"],
     {"train": _image_folder("cat", "dog"), "val": _image_folder("cat", "emu")}, "emu"),
    ("knn-train-data-missing", KNN, ["--weights", f"random:{RECIPE}", "--train-data", "{tmp}/nodata",
                                     "--val-data", "{tmp}/nodata", "--num-workers", "0", "--device", "cpu"], {},
     "nodata"),
    # ---- eval/linear.py
    ("linear-missing-val-data", LINEAR, ["--weights", "x", "--train-data", "d"], {},
     "the following arguments are required: --val-data"),
    ("linear-heldout-fraction", LINEAR, ["--weights", "x", "--train-data", "d", "--val-data", "d",
                                         "--heldout-fraction", "1.5"], {}, "heldout_fraction: got 1.5"),
    ("linear-pipe-url", LINEAR, ["--weights", "x", "--train-data", "d", "--val-data", "pipe:cat b.tar"], {},
     "val_data: got 'pipe:cat b.tar'"),
    ("linear-weights-garbage-safetensors", LINEAR, ["--weights", "{tmp}/w.safetensors", "--train-data", "{tmp}/d",
                                                    "--val-data", "{tmp}/d"],
     {"w.safetensors": b"\xff" * 64, "d": _image_folder("a")}, "w.safetensors: not a readable safetensors file"),
    # ---- eval/finetune.py
    ("finetune-unknown-key", FINETUNE, ["--config", FT_RECIPE, "--output-dir", "{tmp}/ft", "optim.base_lrr=1"], {},
     "optim.base_lrr: unknown key; did you mean optim.base_lr?"),
    ("finetune-recipe-missing", FINETUNE, ["--config", "{tmp}/nope.yaml", "--output-dir", "{tmp}/ft"], {},
     "nope.yaml': not found"),
    ("finetune-weights-missing", FINETUNE, ["--config", FT_RECIPE, "--output-dir", "{tmp}/ft",
                                            "--weights", "{tmp}/missing_run", "data.train={tmp}/d",
                                            "data.val={tmp}/d"],
     {"d": _image_folder("a", "b")}, "missing_run: expected a run dir, a checkpoint folder or a weights file"),
    ("finetune-pipe-url", FINETUNE, ["--config", FT_RECIPE, "--output-dir", "{tmp}/ft", "--weights", "{tmp}/w",
                                     "data.train=pipe:cat a"], {}, "data.train: got 'pipe:cat a'"),
    # ---- python -m ssl_vil.export
    ("export-not-a-run", EXPORT, ["{tmp}/somedir"], {"somedir": _mkdir}, "not a pretraining run directory"),
    ("export-missing-dir", EXPORT, ["{tmp}/nowhere"], {}, "nowhere: not a pretraining run directory"),
    ("export-run-without-checkpoints", EXPORT, ["{tmp}/run"], {"run": _run_dir_without_checkpoints},
     "no valid checkpoint"),
    # ---- python -m ssl_vil.report
    ("report-no-metrics", REPORT, ["{tmp}/run"], {"run": _mkdir}, "metrics file not found"),
    ("report-label-count", REPORT, ["{tmp}/run", "--label", "a", "--label", "b"], {"run": _metrics_run},
     "--label given 2 time(s) for 1 run(s)"),
    ("report-metrics-garbage", REPORT, ["{tmp}/run"], {"run/metrics.jsonl": "not json\n"}, "metrics.jsonl"),
    ("report-output-under-a-file", REPORT, ["{tmp}/run", "--output-dir", "{tmp}/afile/plots"],
     {"run": _metrics_run, "afile": "x"}, "afile/plots: cannot create the plots directory"),
    # ---- python -m ssl_vil.data.make_shards
    ("shards-missing-source", SHARDS, ["{tmp}/nosrc", "{tmp}/out"], {}, "nosrc' is neither builtin:digits"),
    ("shards-other-source-onto-output", SHARDS, ["{tmp}/src_b", "{tmp}/out", "--split", "train",
                                                 "--maxcount", "10"],
     {"out": _finished_shards, "src_b": _image_folder("x", "y", "z")}, "another source"),
    ("shards-workers-zero", SHARDS, ["{tmp}/src", "{tmp}/out", "--workers", "0"], {}, "--workers must be >= 1"),
    ("shards-classes-from-missing", SHARDS, ["{tmp}/src", "{tmp}/out", "--classes-from", "{tmp}/nolist"],
     {"src": _image_folder("a")}, "nolist"),
    # ---- python -m ssl_vil.demo
    ("demo-bad-override", DEMO, ["--output-dir", "{tmp}/demo", "optim.lrr=1"], {},
     "optim.lrr: unknown key; did you mean optim.lr?"),
    # ---- cluster/submit.py
    ("submit-bad-nodes", SUBMIT, ["--config", RECIPE, "--output-dir", "{tmp}/run", "--nodes", "0", "--dry-run"],
     {}, "--nodes: got 0, expected a positive integer"),
    ("submit-nodes-not-int", SUBMIT, ["--config", RECIPE, "--output-dir", "{tmp}/run", "--nodes", "two"], {},
     "--nodes: invalid int value: 'two'"),
    ("submit-knn-without-output-dir", SUBMIT, ["--entry", "knn", "--output-dir", "{tmp}/job", "--cpu", "--dry-run",
                                               "--", "--weights", "{tmp}/w.safetensors", "--train-data", "{tmp}/d",
                                               "--val-data", "{tmp}/d"],
     {"w.safetensors": b"x", "d": _mkdir}, "pass --output-dir after `--`"),
]


def _materialize(tmp: Path, files: dict[str, FileSpec]) -> None:
    for rel, spec in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(spec):
            spec(path)
        elif isinstance(spec, bytes):
            path.write_bytes(spec)
        else:
            path.write_text(spec)


def _env(debug: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SSL_VIL_DEBUG"}
    env.update({"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    if debug:
        env["SSL_VIL_DEBUG"] = "1"
    return env


def _run(command: list[str], argv: list[str], tmp: Path, *, debug: bool = False) -> subprocess.CompletedProcess:
    args = [a.replace("{tmp}", str(tmp)) for a in argv]
    return subprocess.run([sys.executable, *command, *args], cwd=REPO, env=_env(debug), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command, argv, files, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistake_is_one_message(tmp_path: Path, command: list[str], argv: list[str],
                                     files: dict[str, FileSpec], expected: str | tuple[str, ...]) -> None:
    _materialize(tmp_path, files)
    proc = _run(command, argv, tmp_path)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for fragment in (expected,) if isinstance(expected, str) else expected:
        assert fragment.replace("{tmp}", str(tmp_path)) in proc.stderr, proc.stderr[-4000:]


def test_enough_mistakes_are_covered() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("command, argv, files", [
    (KNN, ["--weights", "{tmp}/fake.safetensors", "--train-data", "{tmp}/d", "--val-data", "{tmp}/d"],
     {"fake.safetensors": "text\n" * 20, "d": _image_folder("a")}),
    (EXPORT, ["{tmp}/somedir"], {"somedir": _mkdir}),
], ids=["knn", "export"])
def test_debug_env_shows_the_traceback(tmp_path: Path, command: list[str], argv: list[str],
                                       files: dict[str, FileSpec]) -> None:
    _materialize(tmp_path, files)
    proc = _run(command, argv, tmp_path, debug=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr[-3000:]


def test_one_line_for_user_errors_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    """The shared handler: known user errors become ``<prog>: error: ...`` and SystemExit(2); bugs propagate."""
    from ssl_vil.config.errors import ConfigError
    from ssl_vil.infra.cli_errors import user_errors

    @user_errors("prog")
    def refuses(exc: BaseException) -> int:
        raise exc

    for exc, message in [(ConfigError("got 1, expected 2", key="a.b"), "prog: error: a.b: got 1, expected 2"),
                         (FileNotFoundError(2, "No such file or directory", "/x/y"),
                          "prog: error: /x/y: No such file or directory"),
                         (NotADirectoryError(20, "Not a directory", "/x/f"), "prog: error: /x/f: Not a directory")]:
        with pytest.raises(SystemExit) as info:
            refuses(exc)
        assert info.value.code == 2
        assert capsys.readouterr().err.strip() == message
    with pytest.raises(ZeroDivisionError):
        refuses(ZeroDivisionError("a bug keeps its traceback"))
