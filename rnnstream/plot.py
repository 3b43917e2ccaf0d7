"""One PNG per scored file (``rnnstream detect``): the values on top, the anomaly score below on a shared
time axis, alerts marked on both, labelled windows shaded. Drawn with matplotlib's Agg canvas (no display,
no global pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from rnnstream.detect import FileRun

GAP_FACTOR = 10.0  # a step longer than this many median steps breaks the lines (a gap in the data)


def plot_run(run: FileRun, path: Path, windows: Sequence[tuple[float, float]] = ()) -> Path:
    """Plot the scored rows of ``run`` (refused rows are left out) to ``path``; ``windows``: labelled
    (start, end) spans in seconds since the epoch. Returns ``path``."""
    docs = [d for d in run.docs if d is not None]
    ts = np.array([float(d["ts"]) for d in docs], np.float64)
    values = np.array([_number(d.get("value")) for d in docs], np.float64)
    scores = np.array([_number(d.get("anomaly_score")) for d in docs], np.float64)
    alerts = np.array([bool(d.get("alert")) for d in docs], bool)
    refused = len(run.docs) - len(docs)
    title = f"{run.name}: {len(run.docs):,} rows, {int(alerts.sum())} alerts, {refused} refused"
    return plot_scores(path, title, ts, values, scores, alerts, windows)


def plot_scores(
    path: Path,
    title: str,
    ts: np.ndarray,
    values: np.ndarray,
    scores: np.ndarray,
    alerts: np.ndarray,
    windows: Sequence[tuple[float, float]] = (),
) -> Path:
    """Write the two-panel PNG. ``ts (N,)`` seconds since the epoch (increasing), ``values (N,)`` raw
    units, ``scores (N,)`` in [0, 1], ``alerts (N,)`` bool; ``windows`` (start, end) seconds."""
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    fig.suptitle(title)
    if len(ts) == 0:
        top.text(0.5, 0.5, "no scored rows", ha="center", va="center", transform=top.transAxes)
    else:
        _draw(top, bottom, ts, values, scores, alerts)
    for k, (start, end) in enumerate(windows):
        for ax in (top, bottom):
            label = "labelled window" if k == 0 else None
            ax.axvspan(_time(start), _time(end), color="tab:orange", alpha=0.2, lw=0, label=label)
    if top.get_legend_handles_labels()[0]:
        top.legend(loc="upper left")
    top.set_ylabel("value")
    bottom.set_ylabel("anomaly score")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("time (UTC)")
    fig.savefig(path, dpi=100)
    return path


def _draw(
    top: Axes, bottom: Axes, ts: np.ndarray, values: np.ndarray, scores: np.ndarray, alerts: np.ndarray
) -> None:
    """Lines (broken at gaps) and alert markers on both panels."""
    t, (v, s) = _break_gaps(ts, values, scores)
    top.plot(_time(t), v, lw=0.8, color="tab:blue", marker="." if len(ts) < 50 else None)
    bottom.plot(_time(t), s, lw=0.8, color="tab:green", marker="." if len(ts) < 50 else None)
    if alerts.any():
        when = _time(ts[alerts])
        top.scatter(when, values[alerts], color="tab:red", s=24, zorder=3, label="alert")
        bottom.vlines(when, 0, 1, color="tab:red", lw=0.8)


def _break_gaps(ts: np.ndarray, *series: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """``ts (N,)`` and each ``series (N,)`` with a NaN point inserted inside every gap longer than
    ``GAP_FACTOR`` median steps, so that lines do not bridge missing data."""
    steps = np.diff(ts)
    if len(steps) < 2:
        return ts, list(series)
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median) + 1 if median > 0 else np.zeros(0, np.int64)
    mid = (ts[gaps - 1] + ts[gaps]) / 2
    return np.insert(ts, gaps, mid), [np.insert(np.asarray(x, np.float64), gaps, np.nan) for x in series]


def _time(seconds: np.ndarray | float) -> np.ndarray:
    """Seconds since the epoch as ``datetime64[ms]`` (what matplotlib draws as dates)."""
    return np.round(np.asarray(seconds, np.float64) * 1e3).astype(np.int64).astype("datetime64[ms]")


def _number(value: object) -> float:
    """A document number as a float; NaN for anything else (``None``, several channels)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else float("nan")
