"""MetricsLogger (metrics.jsonl, TensorBoard, progress lines, resume truncation), StepTimer and is_due."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_vil.infra.timing import StepTimer, StepTiming, format_duration, is_due
from ssl_vil.train.metrics_log import MetricsLogger, format_progress
from trainer_harness import logs, records, run_training, tiny_overrides, write_shards


def test_progress_line_format():
    line = format_progress(
        120, 918, eta_s=252.0, img_per_s=98.1, data_wait_fraction=0.03,
        losses={"loss": 5.123, "dino": 4.9, "ibot": 0.2, "koleo": -0.03}, lr=1.2e-3, entropy_ratio=0.81,
    )
    assert line == ("step 120/918 (13%) | ETA 4m12s | 98.1 img/s | data-wait 3% | "
                    "loss 5.123 (dino 4.9 ibot 0.2 koleo -0.03) | lr 1.2e-03 | H/lnK 0.81")
    bare = format_progress(5, 10, eta_s=None, img_per_s=None, data_wait_fraction=None, losses={"dino": 1.0},
                           lr=None, entropy_ratio=None)
    assert bare == "step 5/10 (50%) | dino 1"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (9.4, "9s"), (252, "4m12s"), (3720, "1h02m"),
                                           (90061, "25h01m"), (math.nan, "?"), (-1, "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


class FakeClock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def test_step_timer_splits_data_wait_and_compute():
    # start at 0; step 1: batch at 0.5, done at 2.0; step 2: batch at 2.25, done at 3.0
    timer = StepTimer(clock=FakeClock([0.0, 0.0, 0.5, 2.0, 2.25, 3.0]))
    timer.start()
    timer.data_ready()
    timer.step_done(64)
    timer.data_ready()
    timer.step_done(64)
    timing = timer.pop_window()
    assert timing == StepTiming(steps=2, samples=128, data_wait_s=0.75, compute_s=2.25)
    assert timing.img_per_s == pytest.approx(128 / 3.0)
    assert timing.data_wait_fraction == pytest.approx(0.25)
    assert timing.step_time_s == pytest.approx(1.5)
    assert timer.window() == StepTiming(0, 0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="without data_ready"):
        timer.step_done(1)


def log_steps(logger: MetricsLogger, steps, timer_offset: float = 0.0) -> None:
    for step in steps:
        timing = StepTiming(steps=1, samples=32, data_wait_s=0.1, compute_s=0.3)
        logger.log_step(
            step, samples_seen=32 * step, epoch=step // 10,
            losses={"loss": 10.0 - step, "dino": 8.0 - step, "ibot": 2.0, "koleo": -0.01 * step},
            diagnostics={"teacher_entropy_ratio": 0.5 + 0.01 * step},
            schedules={"lr": 1e-3 * step, "weight_decay": 0.04, "ema_momentum": 0.996, "teacher_temp": 0.04},
            timing=timing, knn_top1=0.1 * step,
        )
        if step % 4 == 0:
            logger.log_event("skipped_step", step=step, reason="spike")


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_records_tensorboard_and_progress(tmp_path, capsys):
    with MetricsLogger(tmp_path, rank=0, log_every_steps=5, total_steps=20) as logger:
        log_steps(logger, range(1, 11))
    records = read_lines(tmp_path / "metrics.jsonl")
    steps = [r for r in records if "event" not in r]
    events = [r for r in records if "event" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert [(e["event"], e["step"], e["reason"]) for e in events] == [("skipped_step", 4, "spike"),
                                                                      ("skipped_step", 8, "spike")]
    r7 = steps[6]
    assert r7["losses"] == {"loss": 3.0, "dino": 1.0, "ibot": 2.0, "koleo": -0.07}
    assert r7["diagnostics"] == {"teacher_entropy_ratio": pytest.approx(0.57)}
    assert (r7["samples_seen"], r7["epoch"], r7["lr"], r7["weight_decay"], r7["ema_momentum"], r7["teacher_temp"]) == \
        (224, 0, pytest.approx(7e-3), 0.04, 0.996, 0.04)
    assert r7["img_per_s"] == pytest.approx(80.0) and r7["data_wait_fraction"] == pytest.approx(0.25)
    assert r7["step_time_s"] == pytest.approx(0.4) and r7["knn_top1"] == pytest.approx(0.7)
    assert r7["max_memory_mb"] > 0

    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert progress == [
        "step 5/20 (25%) | ETA 6s | 80.0 img/s | data-wait 25% | loss 5 (dino 3 ibot 2 koleo -0.05) | lr 5.0e-03"
        " | H/lnK 0.55",
        "step 10/20 (50%) | ETA 4s | 80.0 img/s | data-wait 25% | loss 0 (dino -2 ibot 2 koleo -0.1) | lr 1.0e-02"
        " | H/lnK 0.60",
    ]

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    dino = acc.Scalars("loss/dino")
    assert [(e.step, e.value) for e in dino] == [(s, 8.0 - s) for s in range(1, 11)]
    assert {"diag/teacher_entropy_ratio", "schedule/lr", "perf/img_per_s", "knn_top1"} <= set(acc.Tags()["scalars"])


def tb_scalars(run_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag.startswith(prefix)}


def test_knn_event_accuracies_go_to_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, rank=0, log_every_steps=5, total_steps=20) as logger:
        log_steps(logger, range(1, 6))
        logger.log_event("knn", step=5, knn_top1=61.25, knn_top1_k10=61.25, knn_top5_k10=90.5, knn_top1_k20=58.0,
                         knn_top5_k20=92.75, knn_k=[10, 20], knn_temperature=0.07, knn_num_classes=10)
        logger.log_event("data_errors", step=5, knn_top1=1.0)  # only k-NN events are curves
        logger.log_event("knn", knn_top1=1.0)  # without a step there is no x position
    assert tb_scalars(tmp_path, "knn/") == {
        "knn/top1": [(5, 61.25)], "knn/top1_k10": [(5, 61.25)], "knn/top5_k10": [(5, 90.5)],
        "knn/top1_k20": [(5, 58.0)], "knn/top5_k20": [(5, 92.75)],
    }
    knn_events = [r for r in read_lines(tmp_path / "metrics.jsonl") if r.get("event") == "knn"]
    assert knn_events[0]["knn_k"] == [10, 20] and knn_events[0]["knn_num_classes"] == 10


@pytest.mark.slow
def test_knn_monitor_of_a_real_run_in_tensorboard_equals_metrics_jsonl(tmp_path):
    from sklearn.datasets import load_digits

    write_shards(tmp_path / "train", n_shards=2, per_shard=40)
    digits = load_digits()
    images = (digits.images / 16 * 255).round().astype(np.uint8)
    for split, idx in (("train", range(200)), ("val", range(200, 260))):
        for i in idx:
            folder = tmp_path / "digits" / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert("RGB").resize((32, 32)).save(folder / f"{i:04d}.png")
    run = tmp_path / "run"
    overrides = tiny_overrides(tmp_path / "train", total_steps=10, workers=1, objective="dino") + [
        "logging.tensorboard=true", "knn_monitor.every_steps=5", f"knn_monitor.train={tmp_path / 'digits/train'}",
        f"knn_monitor.val={tmp_path / 'digits/val'}", "knn_monitor.k=[5,20]", "knn_monitor.batch_size=128"]
    assert run_training(run, overrides) == [0], logs(run)

    expected: dict[str, list[tuple[int, float]]] = {}
    for event in (r for r in records(run) if r.get("event") == "knn"):
        for key, value in event.items():
            if m := re.fullmatch(r"knn_(top[15](?:_k\d+)?)", key):
                expected.setdefault(f"knn/{m.group(1)}", []).append((event["step"], float(np.float32(value))))
    assert sorted(expected) == ["knn/top1", "knn/top1_k20", "knn/top1_k5", "knn/top5_k20", "knn/top5_k5"]
    assert [s for s, _ in expected["knn/top1"]] == [5, 10]
    assert tb_scalars(run, "knn/") == expected
    # The step curves are there too, so the k-NN tags sit next to them in one run.
    assert [s for s, _ in tb_scalars(run, "loss/dino")["loss/dino"]] == list(range(1, 11))


def test_resume_truncates_later_steps_without_duplicates(tmp_path, capsys):
    with MetricsLogger(tmp_path, rank=0, log_every_steps=5, total_steps=20) as logger:
        log_steps(logger, range(1, 11))
    # The crash cut the last line short.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "samples_')

    with MetricsLogger(tmp_path, rank=0, log_every_steps=5, total_steps=20, start_step=6) as logger:
        kept = read_lines(tmp_path / "metrics.jsonl")
        assert [r["step"] for r in kept if "event" not in r] == [1, 2, 3, 4, 5, 6]
        assert [r["step"] for r in kept if "event" in r] == [4]
        log_steps(logger, range(7, 13))
    records = read_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 13))
    assert [r["step"] for r in records if "event" in r] == [4, 8, 12]

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/dino")] == list(range(1, 13))


def test_truncate_after_drops_trailing_step_less_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1}, {"event": "start"}, {"step": 2}, {"step": 3}, {"event": "data_errors", "count": 2},
             {"step": 4}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    logger = MetricsLogger(tmp_path, rank=0, log_every_steps=1, total_steps=10, tensorboard=False, start_step=2)
    assert logger.truncate_after(2) == 0  # already done on open
    logger.close()
    assert read_lines(path) == [{"step": 1}, {"event": "start"}, {"step": 2}]


def test_other_ranks_write_nothing(tmp_path):
    with MetricsLogger(tmp_path / "run", rank=1, log_every_steps=1, total_steps=10) as logger:
        assert logger.log_step(1, samples_seen=1, epoch=0, losses={"loss": 1.0}) is None
        assert logger.log_event("x", step=1) is None
    assert not (tmp_path / "run").exists()


def test_reserved_keys_are_rejected(tmp_path):
    with MetricsLogger(tmp_path, rank=0, log_every_steps=1, total_steps=10, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="samples_seen"):
            logger.log_step(1, samples_seen=1, epoch=0, losses={}, schedules={"samples_seen": 3})
        with pytest.raises(ValueError, match="'event'"):
            logger.log_event("x", event="y")


@pytest.mark.parametrize("step, every, total, due", [
    (10, 5, None, True), (11, 5, None, False), (11, 5, 11, True), (12, 5, 11, False),
    (10, 0, None, False), (11, 0, 11, False), (3, -1, 3, False), (1, 1, None, True),
])
def test_is_due(step, every, total, due):
    assert is_due(step, every, total_steps=total) is due
