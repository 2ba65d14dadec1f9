"""Plots of a run's ``metrics.jsonl``: ``python -m ssl_vil.report RUN`` writes PNGs into ``RUN/plots/``.

* ``losses.png``: every loss term vs step, one panel each;
* ``schedules.png``: lr, weight decay, teacher momentum and teacher temperature (those present);
* ``teacher_entropy.png``: H / ln K of the teacher output, with the uniform line 1.0 and the collapse threshold;
* ``knn.png``: k-NN accuracy vs step, when ``knn_top1`` was logged;
* ``throughput.png``: images/s and data-wait fraction.

A plot whose keys never appear is skipped, so runs logged with fewer fields still get the others. Rendering uses
the Agg backend through ``matplotlib.figure.Figure``, so no display and no pyplot global state are involved.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ssl_vil.infra.files import atomic_output

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
SCHEDULE_KEYS = ("lr", "wd", "momentum", "teacher_temp")
ENTROPY_RATIO_KEY = "teacher_entropy_ratio"
COLLAPSE_RATIO = 0.95
KNN_KEYS = ("knn_top1", "knn_top5")

Record = dict[str, Any]


class ReportError(ValueError):
    """The run directory has no usable metrics."""


def read_metrics(path: Path) -> tuple[list[Record], list[Record]]:
    """Step records (with ``step``, without ``event``) and event records, in file order.

    Unparsable lines are skipped with a note on stderr (a live run may be writing its last line); a missing file,
    or one without any step record, raises :class:`ReportError`.
    """
    if not path.is_file():
        raise ReportError(f"{path}: metrics file not found (expected the run directory written by ssl_vil.train)")
    steps: list[Record] = []
    events: list[Record] = []
    bad_lines = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad_lines.append(lineno)
            continue
        if not isinstance(record, dict):
            bad_lines.append(lineno)
        elif "event" in record:
            events.append(record)
        elif "step" in record:
            steps.append(record)
    if bad_lines:
        print(f"{path}: skipped {len(bad_lines)} unparsable line(s): {bad_lines[:10]}", file=sys.stderr)
    if not steps:
        raise ReportError(f"{path}: no step records (the file is empty or holds only events)")
    return steps, events


def _series(records: Iterable[Record], get: Callable[[Record], Any]) -> tuple[list[int], list[float]]:
    """(steps, values) of the records where ``get`` yields a number; a repeated step keeps its last value."""
    by_step: dict[int, float] = {}
    for record in records:
        value = get(record)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            by_step[int(record["step"])] = float(value)
    ordered = sorted(by_step)
    return ordered, [by_step[s] for s in ordered]


def _save(fig: Figure, path: Path) -> Path:
    """Render with Agg and write atomically, so a crash never leaves a truncated PNG."""
    FigureCanvasAgg(fig)
    with atomic_output(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    return path


def _panels(n: int, title: str) -> tuple[Figure, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _plot_panels(series: dict[str, tuple[list[int], list[float]]], title: str, path: Path) -> Path | None:
    series = {name: s for name, s in series.items() if s[0]}
    if not series:
        return None
    fig, axes = _panels(len(series), title)
    for ax, (name, (x, y)) in zip(axes, series.items()):
        ax.plot(x, y, lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_losses(steps: list[Record], out: Path) -> Path | None:
    names: dict[str, None] = {}  # first-seen order, total loss first
    for record in steps:
        names.update(dict.fromkeys(record.get("losses", {})))
    ordered = sorted(names, key=lambda n: n != "loss")
    series = {n: _series(steps, lambda r, n=n: r.get("losses", {}).get(n)) for n in ordered}
    return _plot_panels(series, "loss terms", out / "losses.png")


def plot_schedules(steps: list[Record], out: Path) -> Path | None:
    series = {k: _series(steps, lambda r, k=k: r.get(k)) for k in SCHEDULE_KEYS}
    return _plot_panels(series, "schedules", out / "schedules.png")


def plot_teacher_entropy(steps: list[Record], out: Path) -> Path | None:
    x, y = _series(steps, lambda r: r.get("diagnostics", {}).get(ENTROPY_RATIO_KEY))
    if not x:
        return None
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(x, y, lw=1.2, label="teacher entropy H / ln K")
    ax.axhline(1.0, color="k", lw=1, label="uniform output (H = ln K)")
    ax.axhline(COLLAPSE_RATIO, color="tab:red", ls="--", lw=1, label=f"collapse threshold {COLLAPSE_RATIO:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("H / ln K")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("teacher entropy vs its maximum ln K")
    return _save(fig, out / "teacher_entropy.png")


def plot_knn(steps: list[Record], events: list[Record], out: Path) -> Path | None:
    # k-NN results may come as top-level scalars of step records or as evaluation events carrying a step.
    records = [*steps, *(e for e in events if "step" in e)]
    series = {k: _series(records, lambda r, k=k: r.get(k)) for k in KNN_KEYS}
    series = {k: s for k, s in series.items() if s[0]}
    if "knn_top1" not in series:
        return None
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", lw=1.2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("k-NN accuracy")
    return _save(fig, out / "knn.png")


def plot_throughput(steps: list[Record], out: Path) -> Path | None:
    series = {k: _series(steps, lambda r, k=k: r.get(k)) for k in ("img_per_s", "data_wait_fraction")}
    return _plot_panels(series, "throughput", out / "throughput.png")


def make_report(run_dir: Path) -> list[Path]:
    """Write every plot the metrics allow into ``run_dir/plots``; returns their paths."""
    run_dir = Path(run_dir)
    steps, events = read_metrics(run_dir / METRICS_FILE)
    out = run_dir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    written = [
        plot_losses(steps, out),
        plot_schedules(steps, out),
        plot_teacher_entropy(steps, out),
        plot_knn(steps, events, out),
        plot_throughput(steps, out),
    ]
    return [p for p in written if p is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_vil.report", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory holding metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        paths = make_report(args.run)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
