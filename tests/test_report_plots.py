"""``python -m ssl_vil.report RUN [RUN2 ...]``: overlaid PNG panels with one legend, a summary table, graceful with
missing keys, clear on bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_vil.infra.timing import StepTiming
from ssl_vil.report import NOT_PLOTTED, build_figures, load_runs, main
from ssl_vil.train.metrics_log import MetricsLogger
from trainer_harness import logs, records, run_training, tiny_overrides, write_shards

ALL_PLOTS = ["diagnostics.png", "health.png", "knn.png", "losses.png", "schedules.png", "teacher_entropy.png",
             "throughput.png"]


def wd(step: int, offset: float) -> float:
    return 0.04 + step / 1000 + offset


def write_dino_run(run_dir: Path, offset: float = 0.0, n_steps: int = 40) -> None:
    """A DINO run as the trainer logs it (ibot / koleo / mask_ratio zero), k-NN events at steps 10, 20, 30, 40."""
    with MetricsLogger(run_dir, rank=0, log_every_steps=10, total_steps=n_steps, tensorboard=False) as logger:
        for step in range(1, n_steps + 1):
            logger.log_step(
                step, samples_seen=64 * step, epoch=0,
                losses={"loss": 6.0 / step ** 0.5 + offset, "dino": 6.0 / step ** 0.5 + offset, "ibot": 0.0,
                        "koleo": 0.0},
                diagnostics={"teacher_entropy": 2.0 + step / 100, "teacher_entropy_ratio": 0.9 - step / 100,
                             "student_teacher_kl": 1.0 / step, "center_norm": step / 10, "mask_ratio": 0.0,
                             "grad_norm": 3.0 + offset},
                schedules={"lr": 1e-3 * min(step / 10, 1.0), "weight_decay": wd(step, offset),
                           "ema_momentum": 0.996, "teacher_temp": 0.04 + step / 2000},
                timing=StepTiming(steps=1, samples=64, data_wait_s=0.01 * (step % 3), compute_s=0.5),
                skipped=float(step in (7, 9)),
            )
            if step % 10 == 0:
                top1 = 20.0 + step + offset
                logger.log_event("knn", step=step, knn_top1=top1, knn_top1_k10=top1, knn_top5_k10=top1 + 30,
                                 knn_top1_k20=top1 - 1, knn_top5_k20=top1 + 29, knn_k=[10, 20],
                                 knn_temperature=0.07, knn_crop_pct=1.0, knn_num_classes=10)


def check_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 300 and image.height >= 200
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 5  # something was drawn


def axes_of(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def axes_by_name(figures) -> dict[str, list]:
    """metric name -> the (file, axes) showing it, from each axes' label."""
    out: dict[str, list] = {}
    for file, fig in figures.items():
        for ax in axes_of(fig):
            for name in ax.get_label().split():
                out.setdefault(name, []).append((file, ax))
    return out


def run_lines(ax, labels) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
            if line.get_label() in labels}


def test_two_runs_overlaid_with_one_legend_and_exact_curves(tmp_path, capsys):
    write_dino_run(tmp_path / "dino_a")
    write_dino_run(tmp_path / "dino_b", offset=0.5)
    runs = [tmp_path / "dino_a", tmp_path / "dino_b"]
    figures = build_figures(load_runs(runs, ["A", "B"]))
    assert sorted(figures) == ALL_PLOTS
    for file, fig in figures.items():
        assert len(fig.legends) == 1, file
        assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["A", "B"], file
        for ax in axes_of(fig):
            assert re.search(r"\(.+\)|/ s|MiB", ax.get_ylabel()), (file, ax.get_title(), ax.get_ylabel())
            assert ax.get_xlabel() == "step"

    # Disabled terms (zero at every step) have no panel; the trainer's schedule names do.
    assert [ax.get_label() for ax in axes_of(figures["losses.png"])] == ["losses.loss", "losses.dino"]
    assert [ax.get_label() for ax in axes_of(figures["schedules.png"])] == \
        ["lr", "weight_decay", "ema_momentum", "teacher_temp"]
    assert [ax.get_label() for ax in axes_of(figures["diagnostics.png"])] == \
        ["diagnostics.teacher_entropy", "diagnostics.student_teacher_kl", "diagnostics.center_norm",
         "diagnostics.grad_norm"]
    wd_ax = axes_of(figures["schedules.png"])[1]
    assert wd_ax.get_title() == "weight decay" and wd_ax.get_ylabel() == "coefficient (dimensionless)"
    lines = run_lines(wd_ax, {"A", "B"})
    assert lines["A"] == (list(range(1, 41)), [wd(s, 0.0) for s in range(1, 41)])
    assert lines["B"] == (list(range(1, 41)), [wd(s, 0.5) for s in range(1, 41)])
    skipped = run_lines(axes_of(figures["health.png"])[0], {"A"})["A"]
    assert skipped[1][5:10] == [0.0, 1.0, 1.0, 2.0, 2.0]  # cumulative: steps 7 and 9

    knn = axes_of(figures["knn.png"])
    assert [ax.get_title() for ax in knn] == ["k-NN top-1 (k = 10)", "k-NN top-5 (k = 10)", "k-NN top-1 (k = 20)",
                                              "k-NN top-5 (k = 20)"]
    assert [ax.get_ylabel() for ax in knn] == ["top-1 accuracy (%)", "top-5 accuracy (%)"] * 2
    assert "T 0.07" in figures["knn.png"].get_suptitle() and "crop_pct 1" in figures["knn.png"].get_suptitle()
    assert run_lines(knn[0], {"B"})["B"] == ([10, 20, 30, 40], [30.5, 40.5, 50.5, 60.5])
    assert run_lines(knn[3], {"A"})["A"] == ([10, 20, 30, 40], [59.0, 69.0, 79.0, 89.0])
    for ax, chance in zip(knn, (10.0, 50.0, 10.0, 50.0)):  # 10 classes: 1/10 top-1, 5/10 top-5
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [chance, chance]
        assert dashed[0].get_label().startswith("chance top-")
    legend = [t.get_text() for t in figures["knn.png"].legends[0].get_texts()]
    assert legend == ["A", "B", "chance top-1: 1/10 classes = 10 %", "chance top-5: 5/10 classes = 50 %"]

    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main([*map(str, runs), "--label", "A", "--label", "B", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sorted(Path(p).name for p in printed[:len(ALL_PLOTS)]) == ALL_PLOTS
    assert sorted(p.name for p in out.iterdir()) == ALL_PLOTS
    for name in ALL_PLOTS:
        check_png(out / name)
    assert printed[len(ALL_PLOTS):] == [
        "",
        "run  steps  final loss  k-NN k  top-1 final %  top-1 best %  top-5 final %  top-5 best %",
        "A       40      0.9487      10          60.00         60.00          90.00         90.00",
        "B       40      1.4487      10          60.50         60.50          90.50         90.50",
    ]


def test_default_output_dirs_and_labels(tmp_path, capsys):
    for parent in ("x", "y"):
        write_dino_run(tmp_path / parent / "run", n_steps=10)
    capsys.readouterr()
    assert main([str(tmp_path / "x" / "run")]) == 0
    assert sorted(p.name for p in (tmp_path / "x" / "run" / "plots").iterdir()) == ALL_PLOTS
    # Two runs with the same directory name: the legend falls back to the paths.
    assert main([str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]) == 0
    compare = tmp_path / "x" / "run" / "plots" / "compare"
    assert sorted(p.name for p in compare.iterdir()) == ALL_PLOTS
    table = capsys.readouterr().out.splitlines()[-2:]
    assert [row.split()[0] for row in table] == [str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]


def test_label_count_must_match_runs(tmp_path, capsys):
    write_dino_run(tmp_path / "a", n_steps=10)
    write_dino_run(tmp_path / "b", n_steps=10)
    capsys.readouterr()
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--label", "only-one"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --label given 1 time(s) for 2 run(s); expected one per run"
    assert not (tmp_path / "a" / "plots").exists()


def test_report_skips_plots_whose_keys_are_missing(tmp_path, capsys):
    lines = [{"step": s, "losses": {"dino": 1.0 / s}} for s in range(1, 6)] + [{"event": "start"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "los')
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr()
    printed = out.out.splitlines()
    assert [Path(p).name for p in printed[:printed.index("")]] == ["losses.png"]
    assert printed[-1].split() == [tmp_path.name, "5", "-", "-", "-", "-", "-", "-"]
    assert "skipped 1 unparsable line(s): [7]" in out.err
    check_png(tmp_path / "plots" / "losses.png")


def test_knn_without_k_or_class_count(tmp_path):
    lines = [{"step": s, "losses": {"loss": 1.0 / s}} for s in range(1, 3)] + [
        {"step": 3, "losses": {"loss": 0.25}, "knn_top1": 42.0},
        {"event": "knn", "step": 3, "knn_top5": 80.0, "knn_num_classes": None},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    fig = build_figures(load_runs([tmp_path]))["knn.png"]
    knn = axes_of(fig)
    assert [ax.get_title() for ax in knn] == ["k-NN top-1 (k not logged)", "k-NN top-5 (k not logged)"]
    assert [ax.get_label() for ax in knn] == ["knn_top1", "knn_top5"]
    assert [[list(line.get_ydata()) for line in ax.get_lines()] for ax in knn] == [[[42.0]], [[80.0]]]
    assert fig.get_suptitle().endswith("(in-training monitor; chance level not drawn: class count not logged)")


def test_missing_or_empty_metrics_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics file not found" in err and str(tmp_path / "metrics.jsonl") in err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path)]) == 2
    assert "no step records" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def digits_image_folder(root: Path, n_train: int = 200, n_val: int = 60) -> Path:
    """Digits as an ImageFolder (class names -> the monitor logs the class count): train / val sub-folders."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16 * 255).round().astype(np.uint8)
    for split, idx in (("train", range(n_train)), ("val", range(n_train, n_train + n_val))):
        for i in idx:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert("RGB").resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root


def monitored_overrides(tmp_path: Path, seed: int) -> list[str]:
    """A tiny DINO run on synthetic shards with the k-NN monitor (k = 5, 20) on digits at steps 5 and 10."""
    digits = tmp_path / "digits"
    if not digits.exists():
        write_shards(tmp_path / "train", n_shards=2, per_shard=40)
        digits_image_folder(digits)
    return tiny_overrides(tmp_path / "train", total_steps=10, workers=1, objective="dino") + [
        "knn_monitor.every_steps=5", f"knn_monitor.train={digits / 'train'}", f"knn_monitor.val={digits / 'val'}",
        "knn_monitor.k=[5,20]", "knn_monitor.batch_size=128", f"train.seed={seed}"]


def logged_names(run_dir: Path) -> dict[str, list[float]]:
    """Every metric the trainer wrote (dotted for nested sections) -> its values, from metrics.jsonl."""
    names: dict[str, list[float]] = {}
    for rec in records(run_dir):
        if rec.get("event") not in (None, "knn"):
            continue
        for key, value in rec.items():
            if key == "event" or key in NOT_PLOTTED:
                continue
            items = [(f"{key}.{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
            for name, v in items:
                names.setdefault(name, []).extend(v if isinstance(v, list) else [v])
    return names


@pytest.mark.slow
def test_every_name_a_real_run_logs_has_a_panel(tmp_path, capsys):
    runs = [tmp_path / "seed0", tmp_path / "seed1"]
    for seed, run in enumerate(runs):
        assert run_training(run, monitored_overrides(tmp_path, seed)) == [0], logs(run)
    names = logged_names(runs[0])
    zero = {n for n, values in names.items() if all(v == 0 for v in values)}
    assert zero == {"losses.ibot", "losses.koleo", "diagnostics.mask_ratio", "skipped"}  # a DINO run
    disabled = zero - {"skipped"}  # no skipped step is a result worth a panel, not a feature switched off
    # The names the schedules panels are looked up by, as the trainer writes them.
    assert {"lr", "weight_decay", "ema_momentum", "teacher_temp", "knn_top1_k20", "knn_num_classes"} <= set(names)

    figures = build_figures(load_runs(runs))
    shown = axes_by_name(figures)
    assert sorted(set(names) - disabled - set(shown)) == []  # every logged metric has a panel...
    assert sorted(disabled & set(shown)) == []  # ...except the disabled terms
    for fig in figures.values():
        assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["seed0", "seed1"]
    dino_ax = shown["losses.dino"][0][1]
    expected = {run.name: [r["losses"]["dino"] for r in records(run) if "losses" in r] for run in runs}
    assert {k: v[1] for k, v in run_lines(dino_ax, set(expected)).items()} == expected

    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main([*map(str, runs), "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ALL_PLOTS
    table = capsys.readouterr().out.splitlines()[-2:]
    for row, run in zip(table, runs):
        knn = [r for r in records(run) if r.get("event") == "knn"]
        final_loss = [r for r in records(run) if "losses" in r][-1]["losses"]["loss"]
        assert row.split() == [run.name, "10", f"{final_loss:.4f}", "5", f"{knn[-1]['knn_top1_k5']:.2f}",
                               f"{max(e['knn_top1_k5'] for e in knn):.2f}", f"{knn[-1]['knn_top5_k5']:.2f}",
                               f"{max(e['knn_top5_k5'] for e in knn):.2f}"]


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    write_dino_run(tmp_path / "a", n_steps=12)
    write_dino_run(tmp_path / "b", n_steps=12, offset=1.0)
    proc = subprocess.run([sys.executable, "-m", "ssl_vil.report", str(tmp_path / "a"), str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split("\n\n")[0].split()
    assert sorted(Path(p).name for p in paths) == ALL_PLOTS
    assert all(Path(p).parent == tmp_path / "a" / "plots" / "compare" for p in paths)
