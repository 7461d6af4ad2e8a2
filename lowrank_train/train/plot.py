"""Pictures of a run from its ``metrics.jsonl``: loss (train and held-out), learning rate and throughput.

``lowrank-train plot RUN_DIR`` writes ``RUN_DIR/plots/{loss,lr,throughput}.png``; a run writes them itself at its
end when matplotlib is installed. Figures are drawn with matplotlib's Agg canvas directly, without ``pyplot``, so
neither the backend nor any global figure state of the calling program is touched.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lowrank_train.folders import write_file
from lowrank_train.train.metrics import read_metrics

PLOTS_FOLDER = "plots"
# figure file stem -> (title, y label, {legend label: (split, record key)})
FIGURES: dict[str, tuple[str, str, dict[str, tuple[str, str]]]] = {
    "loss": ("loss", "cross-entropy", {"train": ("train", "loss"), "held-out": ("eval", "loss")}),
    "lr": ("learning rate", "lr", {"lr": ("train", "lr")}),
    "throughput": ("throughput", "tokens / s", {"tokens/s": ("train", "tokens_per_s")}),
}

Series = dict[str, tuple[list[int], list[float]]]


def metric_series(records: Sequence[Mapping[str, Any]]) -> dict[str, Series]:
    """The curves of every figure: ``{figure: {label: (steps, values)}}`` from metrics records, in step order.

    Labels without any record (e.g. no held-out evaluation) are left out.
    """
    series: dict[str, Series] = {}
    for figure, (_, _, curves) in FIGURES.items():
        series[figure] = {}
        for label, (split, key) in curves.items():
            points = sorted((int(r["step"]), float(r[key])) for r in records if r.get("split") == split and key in r)
            if points:
                series[figure][label] = ([s for s, _ in points], [v for _, v in points])
    return series


def plot_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> list[Path]:
    """Writes one PNG per figure of :data:`FIGURES` that has data.

    Args:
        run_dir: a run folder holding ``metrics.jsonl``.
        out: destination folder (default ``RUN_DIR/plots``).

    Returns:
        The files written.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
        FileNotFoundError: ``run_dir`` has no ``metrics.jsonl``.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError("plotting needs matplotlib: pip install matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics_file = Path(run_dir) / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} does not exist: is {run_dir} a run folder?")
    folder = Path(out) if out is not None else Path(run_dir) / PLOTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, curves in metric_series(read_metrics(run_dir)).items():
        if not curves:
            continue
        title, ylabel, _ = FIGURES[name]
        figure = Figure(figsize=(6.4, 4.0), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for label, (steps, values) in curves.items():
            # A few held-out points read better as markers on the train curve.
            axes.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None)
        axes.set(title=f"{title} ({Path(run_dir).name})", xlabel="optimizer step", ylabel=ylabel)
        axes.grid(alpha=0.3)
        if len(curves) > 1:
            axes.legend()
        figure.tight_layout()
        path = folder / f"{name}.png"
        with write_file(path) as staging:
            figure.savefig(staging)
        written.append(path)
    return written


def plot_run_if_possible(run_dir: str | os.PathLike[str]) -> list[Path]:
    """:func:`plot_run` when matplotlib is installed, else nothing (the end of a run; plotting is optional)."""
    if importlib.util.find_spec("matplotlib") is None:
        return []
    return plot_run(run_dir)
