"""Plots of one or several runs' ``metrics.jsonl``: ``python -m ssl_vil.report RUN [RUN2 ...] [--label NAME ...]``.

Every run is overlaid on the same panels in its own colour; each PNG has one legend whose labels are the run
directory names (or the ``--label`` values, in run order). The PNGs go to ``RUN/plots/`` for one run and to
``RUN1/plots/compare/`` for several (``--output-dir`` overrides), one per panel group:

* ``losses.png``: one panel per active loss term (a term that is absent or zero at every step is disabled, e.g.
  ``ibot`` / ``koleo`` in a DINO run, and gets no panel);
* ``schedules.png``: lr, weight decay, teacher EMA momentum and teacher temperature;
* ``diagnostics.png``: teacher entropy, student-teacher KL, center norm, mask ratio, gradient norm;
* ``teacher_entropy.png``: H / ln K of the teacher output, with the uniform line 1.0 and the collapse threshold;
* ``knn.png``: in-training k-NN top-1 and top-5 per logged k, with the chance level as a dashed line;
* ``throughput.png``: images/s, data-wait fraction, step time, peak memory;
* ``health.png``: cumulative skipped steps and bad-data counters.

A panel whose metric never appears (or is disabled) is skipped, and so is a PNG without panels. After the paths, a
summary table is printed: final loss and final / best k-NN top-1 and top-5 per run. Rendering uses the Agg
backend through ``matplotlib.figure.Figure``, so no display and no pyplot global state are involved.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors
from ssl_vil.infra.files import atomic_output

if TYPE_CHECKING:  # matplotlib loads when a figure is drawn, not for --help
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
COMPARE_DIR = "compare"
ENTROPY_RATIO_KEY = "teacher_entropy_ratio"
COLLAPSE_RATIO = 0.95
# Fields of the trainer's k-NN monitor record besides the accuracies: the protocol (shown in the title) and the
# class count (the chance level).
KNN_K_KEY = "knn_k"
NUM_CLASSES_KEY = "knn_num_classes"
KNN_PROTOCOL_KEYS = {"knn_temperature": "T", "knn_crop_pct": "crop_pct"}
# Bookkeeping fields of a step record: the x axis and its aliases, not metrics.
NOT_PLOTTED = frozenset({"step", "samples_seen", "epoch", "time_s"})

Record = dict[str, Any]
Series = tuple[list[int], list[float]]

_KNN_KEY = re.compile(r"^knn_top([15])(?:_k(\d+))?$")


class ReportError(ValueError):
    """A run directory has no usable metrics, or the command line does not fit the runs."""


@dataclass(frozen=True)
class Panel:
    """One axes: the dotted metric name(s) it shows (``losses.dino``, ``weight_decay``), its title and y label."""

    names: tuple[str, ...]
    title: str
    ylabel: str
    get: Callable[[Record], Any]
    # All-zero means the feature is off (a loss term with weight 0, no masking, Sinkhorn instead of a center).
    zero_is_disabled: bool = False
    cumulative: bool = False


@dataclass
class Run:
    label: str
    path: Path
    steps: list[Record]
    events: list[Record]


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


def load_runs(run_dirs: Sequence[Path], labels: Sequence[str] | None = None) -> list[Run]:
    """Read every run; labels default to the directory names (the full paths where two names collide)."""
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise ReportError("no run directory given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ReportError(f"--label given {len(labels)} time(s) for {len(run_dirs)} run(s); expected one per run")
    if labels is None:
        names = [p.resolve().name or str(p) for p in run_dirs]
        labels = names if len(set(names)) == len(names) else [str(p) for p in run_dirs]
    return [Run(label, p, *read_metrics(p / METRICS_FILE)) for label, p in zip(labels, run_dirs)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(records: Iterable[Record], get: Callable[[Record], Any]) -> Series:
    """(steps, values) of the records where ``get`` yields a number; a repeated step keeps its last value."""
    by_step: dict[int, float] = {}
    for record in records:
        value = get(record)
        if _is_number(value) and "step" in record:
            by_step[int(record["step"])] = float(value)
    ordered = sorted(by_step)
    return ordered, [by_step[s] for s in ordered]


def _nested(section: str, key: str) -> Callable[[Record], Any]:
    return lambda r: (r.get(section) or {}).get(key)


def _top(key: str) -> Callable[[Record], Any]:
    return lambda r: r.get(key)


LOSS_UNITS = {"loss": "weighted sum (nats)", "dino": "cross-entropy (nats)", "ibot": "cross-entropy (nats)",
              "koleo": "-log NN distance (nats)"}
SCHEDULE_PANELS = (
    Panel(("lr",), "learning rate", "lr (dimensionless)", _top("lr")),
    Panel(("weight_decay",), "weight decay", "coefficient (dimensionless)", _top("weight_decay")),
    Panel(("ema_momentum",), "teacher EMA momentum", "momentum (dimensionless)", _top("ema_momentum")),
    Panel(("teacher_temp",), "teacher temperature", "temperature (dimensionless)", _top("teacher_temp")),
)
DIAGNOSTIC_PANELS = (
    Panel(("diagnostics.teacher_entropy",), "teacher entropy H", "entropy (nats)",
          _nested("diagnostics", "teacher_entropy")),
    Panel(("diagnostics.student_teacher_kl",), "KL(teacher || student)", "KL divergence (nats)",
          _nested("diagnostics", "student_teacher_kl")),
    Panel(("diagnostics.center_norm",), "DINO center norm", "L2 norm (logit units)",
          _nested("diagnostics", "center_norm"), zero_is_disabled=True),
    Panel(("diagnostics.mask_ratio",), "masked patch ratio", "fraction of patches (0-1)",
          _nested("diagnostics", "mask_ratio"), zero_is_disabled=True),
    Panel(("diagnostics.grad_norm",), "gradient norm", "L2 norm over all parameters (dimensionless)",
          _nested("diagnostics", "grad_norm")),
)
THROUGHPUT_PANELS = (
    Panel(("img_per_s",), "throughput", "images / s", _top("img_per_s")),
    Panel(("data_wait_fraction",), "data wait", "fraction of step time (0-1)", _top("data_wait_fraction")),
    Panel(("step_time_s",), "step time", "seconds / step", _top("step_time_s")),
    Panel(("max_memory_mb",), "peak memory", "MiB", _top("max_memory_mb")),
)
SKIPPED_PANEL = Panel(("skipped",), "skipped steps", "steps (cumulative count)", _top("skipped"), cumulative=True)


def _loss_panels(runs: Sequence[Run]) -> list[Panel]:
    names: dict[str, None] = {}  # first-seen order, total loss first
    for run in runs:
        for record in run.steps:
            names.update(dict.fromkeys(record.get("losses") or {}))
    ordered = sorted(names, key=lambda n: n != "loss")
    return [Panel((f"losses.{n}",), "total loss" if n == "loss" else f"{n} loss", LOSS_UNITS.get(n, "loss (nats)"),
                  _nested("losses", n), zero_is_disabled=True) for n in ordered]


def _health_panels(runs: Sequence[Run]) -> list[Panel]:
    # data_<category>: the trainer's global bad-data totals, logged only once non-zero.
    names: dict[str, None] = {}
    for run in runs:
        for record in run.steps:
            names.update(dict.fromkeys(k for k in record if k.startswith("data_") and k != "data_wait_fraction"))
    return [SKIPPED_PANEL, *(Panel((n,), f"bad data: {n[len('data_'):]}", "samples (cumulative count)", _top(n))
                             for n in names)]


def _run_series(run: Run, panel: Panel) -> Series:
    x, y = _series(run.steps, panel.get)
    if panel.cumulative:
        total = 0.0
        y = [total := total + v for v in y]
    return x, y


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _line(ax: Axes, x: list[int], y: list[float], i: int, label: str) -> None:
    # Markers on sparse series: metrics logged every N steps (throughput, k-NN) may have a single point.
    ax.plot(x, y, lw=1.2, color=_colour(i), label=label, marker="o" if len(x) <= 30 else None, ms=3)


def _panel_figure(title: str, n: int, max_cols: int = 3) -> tuple[Figure, list[Axes]]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * cols, 3.2 * rows + 0.6), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _finish(fig: Figure, runs: Sequence[Run], extra: Sequence[Line2D] = ()) -> Figure:
    """One legend for the whole figure: a line per run (its colour), then the reference lines."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_colour(i), lw=1.5, label=run.label) for i, run in enumerate(runs)]
    handles += list(extra)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small")
    return fig


def _style(ax: Axes, names: Sequence[str], title: str, ylabel: str) -> None:
    ax.set_label(" ".join(names))  # the metric names this axes shows, so a figure can be checked by name
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _panels_figure(runs: Sequence[Run], panels: Sequence[Panel], title: str) -> Figure | None:
    """Each panel with every run overlaid; panels no run has (or that are disabled in every run) are dropped."""
    drawn: list[tuple[Panel, list[Series]]] = []
    for panel in panels:
        per_run = [_run_series(run, panel) for run in runs]
        if panel.zero_is_disabled:
            per_run = [(x, y) if any(v != 0 for v in y) else ([], []) for x, y in per_run]
        if any(x for x, _ in per_run):
            drawn.append((panel, per_run))
    if not drawn:
        return None
    fig, axes = _panel_figure(title, len(drawn))
    for ax, (panel, per_run) in zip(axes, drawn):
        for i, (x, y) in enumerate(per_run):
            if x:
                _line(ax, x, y, i, runs[i].label)
        _style(ax, panel.names, panel.title, panel.ylabel)
    return _finish(fig, runs)


def _entropy_figure(runs: Sequence[Run]) -> Figure | None:
    panel = Panel((f"diagnostics.{ENTROPY_RATIO_KEY}",), "teacher entropy vs its maximum ln K",
                  "H / ln K (dimensionless)", _nested("diagnostics", ENTROPY_RATIO_KEY))
    per_run = [_run_series(run, panel) for run in runs]
    if not any(x for x, _ in per_run):
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (x, y) in enumerate(per_run):
        if x:
            _line(ax, x, y, i, runs[i].label)
    uniform = ax.axhline(1.0, color="k", lw=1, label="uniform output (H = ln K)")
    collapse = ax.axhline(COLLAPSE_RATIO, color="tab:red", ls="--", lw=1,
                          label=f"collapse threshold {COLLAPSE_RATIO:g}")
    ax.set_ylim(0, 1.05)
    _style(ax, panel.names, panel.title, panel.ylabel)
    return _finish(fig, runs, [uniform, collapse])


@dataclass
class KnnSeries:
    """One run's k-NN accuracies in percent: ``values[(top, k)] = (steps, values)``; ``k`` None when not logged."""

    values: dict[tuple[int, int | None], Series]
    first_k: int | None
    num_classes: set[int]
    protocol: dict[str, set[Any]]  # logged protocol fields (``knn_temperature``, ...) -> the values seen
    shown: set[str]  # the non-accuracy fields that went into the plot (k, protocol, class count)


def knn_series(run: Run) -> KnnSeries:
    """k-NN results of a run, from ``knn`` events (the trainer's monitor) and step-record scalars.

    ``knn_top{1,5}_k{K}`` give top-1 / top-5 at K; a bare ``knn_top1`` is the first K's top-1 when the record
    has ``_k`` keys (the monitor's summary value), else a result whose k was not logged. The first K is
    ``knn_k[0]`` when logged, else the first ``_k`` key of the record.
    """
    points: dict[tuple[int, int | None], dict[int, float]] = {}
    first_k: int | None = None
    num_classes: set[int] = set()
    protocol: dict[str, set[Any]] = {}
    shown: set[str] = set()
    for record in [*run.steps, *(e for e in run.events if "step" in e)]:
        parsed = [(m, v) for key, v in record.items() if (m := _KNN_KEY.match(key)) and _is_number(v)]
        if not parsed:
            continue
        ks = [int(m.group(2)) for m, _ in parsed if m.group(2)]
        logged_ks = record.get(KNN_K_KEY)
        if isinstance(logged_ks, list) and logged_ks:
            shown.add(KNN_K_KEY)
            first_k = int(logged_ks[0]) if first_k is None else first_k
        elif ks and first_k is None:
            first_k = ks[0]
        for m, value in parsed:
            if m.group(2) is None and ks:
                continue  # alias of the first k's value
            points.setdefault((int(m.group(1)), int(m.group(2)) if m.group(2) else None), {})[
                int(record["step"])] = float(value)
        if _is_number(record.get(NUM_CLASSES_KEY)):
            num_classes.add(int(record[NUM_CLASSES_KEY]))
            shown.add(NUM_CLASSES_KEY)
        for key in KNN_PROTOCOL_KEYS:
            if _is_number(record.get(key)):
                protocol.setdefault(key, set()).add(record[key])
                shown.add(key)
    values = {key: (sorted(p), [p[s] for s in sorted(p)]) for key, p in points.items()}
    return KnnSeries(values, first_k, num_classes, protocol, shown)


def chance_level(top: int, num_classes: int) -> float:
    """Accuracy in percent of guessing uniformly: top-1 = 1 / C, top-5 = min(5, C) / C."""
    return 100.0 * min(top, num_classes) / num_classes


def _knn_figure(runs: Sequence[Run]) -> Figure | None:
    per_run = [knn_series(run) for run in runs]
    keys = sorted({key for s in per_run for key in s.values}, key=lambda t: (t[1] is not None, t[1] or 0, t[0]))
    if not keys:
        return None
    classes = sorted(set().union(*(s.num_classes for s in per_run)))
    first_ks = {s.first_k for s in per_run}
    protocol = {key: sorted(set().union(*(s.protocol.get(key, set()) for s in per_run))) for key in KNN_PROTOCOL_KEYS}
    details = "; ".join(f"{KNN_PROTOCOL_KEYS[key]} {' / '.join(format(v, 'g') for v in vals)}"
                        for key, vals in protocol.items() if vals)
    if not classes:
        # A data set without class names (bare shards) logs no class count, so there is no chance level to draw.
        details += ("; " if details else "") + "chance level not drawn: class count not logged"
    # Two columns: top-1 and top-5 of one k side by side.
    fig, axes = _panel_figure("k-NN accuracy of the teacher backbone (in-training monitor"
                              + (f"; {details})" if details else ")"), len(keys), max_cols=2)
    shown = sorted(set().union(*(s.shown for s in per_run)))
    chance_lines: dict[tuple[int, int], Line2D] = {}
    for ax, (top, k) in zip(axes, keys):
        for i, s in enumerate(per_run):
            if (top, k) in s.values:
                x, y = s.values[(top, k)]
                _line(ax, x, y, i, runs[i].label)
        names = [f"knn_top{top}_k{k}" if k is not None else f"knn_top{top}"]
        if top == 1 and k is not None and k in first_ks:
            names.append("knn_top1")
        k_text = f"k = {k}" if k is not None else "k not logged"
        _style(ax, names + shown, f"k-NN top-{top} ({k_text})", f"top-{top} accuracy (%)")
        for c in classes:
            level = chance_level(top, c)
            chance_lines[(top, c)] = ax.axhline(
                level, color="0.4", ls="--", lw=1,
                label=f"chance top-{top}: {min(top, c)}/{c} classes = {level:.3g} %")
    return _finish(fig, runs, list(chance_lines.values()))


def build_figures(runs: Sequence[Run]) -> dict[str, Figure]:
    """Every figure the runs' metrics allow, by PNG file name; each axes' label lists the metrics it shows."""
    figures = {
        "losses.png": _panels_figure(runs, _loss_panels(runs), "loss terms"),
        "schedules.png": _panels_figure(runs, SCHEDULE_PANELS, "schedules"),
        "diagnostics.png": _panels_figure(runs, DIAGNOSTIC_PANELS, "training diagnostics"),
        "teacher_entropy.png": _entropy_figure(runs),
        "knn.png": _knn_figure(runs),
        "throughput.png": _panels_figure(runs, THROUGHPUT_PANELS, "throughput and memory"),
        "health.png": _panels_figure(runs, _health_panels(runs), "skipped steps and bad data"),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}


def _save(fig: Figure, path: Path) -> Path:
    """Render with Agg and write atomically, so a crash never leaves a truncated PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_output(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    return path


@dataclass(frozen=True)
class Summary:
    label: str
    last_step: int
    final_loss: float | None
    knn_k: int | None
    top1_final: float | None
    top1_best: float | None
    top5_final: float | None
    top5_best: float | None


def summarize(run: Run) -> Summary:
    """Final total loss and final / best k-NN top-1 and top-5 at the run's first logged k."""
    x, y = _series(run.steps, _nested("losses", "loss"))
    knn = knn_series(run)
    k = knn.first_k

    def final_best(top: int) -> tuple[float | None, float | None]:
        _, values = knn.values.get((top, k), ([], []))
        return (values[-1], max(values)) if values else (None, None)

    (t1f, t1b), (t5f, t5b) = final_best(1), final_best(5)
    return Summary(run.label, max(int(r["step"]) for r in run.steps), y[-1] if y else None, k, t1f, t1b, t5f, t5b)


def format_summary(summaries: Sequence[Summary]) -> str:
    """A plain-text table, one row per run; ``-`` where a value was not logged."""
    header = ("run", "steps", "final loss", "k-NN k", "top-1 final %", "top-1 best %", "top-5 final %",
              "top-5 best %")

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [(s.label, str(s.last_step), num(s.final_loss, ".4f"), "-" if s.knn_k is None else str(s.knn_k),
             num(s.top1_final, ".2f"), num(s.top1_best, ".2f"), num(s.top5_final, ".2f"), num(s.top5_best, ".2f"))
            for s in summaries]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in (header, *rows)]
    return "\n".join(lines)


def default_output_dir(run_dirs: Sequence[Path]) -> Path:
    """``RUN/plots`` for one run, ``RUN1/plots/compare`` for several."""
    first = Path(run_dirs[0]) / PLOTS_DIR
    return first if len(run_dirs) == 1 else first / COMPARE_DIR


def write_figures(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Save :func:`build_figures` as PNGs into ``out_dir``; returns their paths."""
    figures = build_figures(runs)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"{out_dir}: cannot create the plots directory ({err.strerror})") from None
    return [_save(fig, out_dir / name) for name, fig in figures.items()]


def make_report(run_dirs: str | Path | Sequence[str | Path], *, labels: Sequence[str] | None = None,
                out_dir: Path | None = None) -> list[Path]:
    """Write every plot the metrics allow (see the module docstring); returns their paths."""
    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(p) for p in run_dirs]
    runs = load_runs(run_dirs, labels)
    return write_figures(runs, Path(out_dir) if out_dir is not None else default_output_dir(run_dirs))


@user_errors("python -m ssl_vil.report")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_vil.report", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    add_version(parser)
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run directories holding metrics.jsonl")
    parser.add_argument("--label", action="append", default=None,
                        help="legend label of a run, once per RUN in the same order (default: directory names)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"where the PNGs go (default: RUN/{PLOTS_DIR}, or RUN1/{PLOTS_DIR}/{COMPARE_DIR} for "
                             "several runs)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs, args.label)
        paths = write_figures(runs, args.output_dir or default_output_dir(args.runs))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    print()
    print(format_summary([summarize(run) for run in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
