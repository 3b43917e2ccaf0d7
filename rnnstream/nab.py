"""Scoring anomaly detectors the way the Numenta Anomaly Benchmark does (NAB v1.1).

From Lavin & Ahmad, "Evaluating Real-time Anomaly Detection Algorithms" (2015), and NAB's reference
scorer; the facts are collected in ``../shared/GUIDE.md`` section 7. For one file of ``N`` rows:

- The first ``min(floor(0.15 N), 750)`` rows are probationary: a detection there is never scored.
- A row whose score is ``>= threshold`` is a detection.
- Inside an anomaly window of ``w`` rows ending at row ``R``, a detection at row ``i`` sits at
  ``p = -(R - i + 1) / w`` (-1 at the window's first row, ``-1/w`` at its last) and earns
  ``tp · σ(p) / σ(-1)``, with the scaled sigmoid ``σ(p) = 2 / (1 + e^{5p}) - 1``. Only a window's best (its
  earliest) detection counts; a window without one costs ``-fn``.
- A detection outside every window costs ``fp · σ(q)``, ``q = |i - R_prev| / (w_prev - 1)`` measuring how
  far past the previous window it is (``σ = -1`` for ``q > 3``, and ``-1`` before the first window): just
  after a window it costs almost nothing, far from one the full ``fp``.

One threshold per profile is chosen for the whole corpus, the one maximising the summed raw score, and
the raw score is normalised so that the null detector (never fires) scores 0 and the perfect one (fires at
each window's first row, nowhere else) 100: ``100 · (raw - raw_null) / (raw_perfect - raw_null)``, with
``raw_null = -fn · windows`` and ``raw_perfect = tp · windows``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750


@dataclass(frozen=True)
class Profile:
    """The weights of true positives, false positives and false negatives (missed windows)."""

    tp: float
    fp: float
    fn: float


PROFILES = {
    "standard": Profile(1.0, 0.11, 1.0),
    "reward_low_FP": Profile(1.0, 0.22, 1.0),
    "reward_low_FN": Profile(1.0, 0.11, 2.0),
}


@dataclass(frozen=True)
class ScoredFile:
    """One file's detector output: ``scores (N,)`` in [0, 1] per row, and its anomaly ``windows`` as
    inclusive row ranges ``[(first, last), ...]``, in order and not overlapping."""

    name: str
    scores: np.ndarray
    windows: list[tuple[int, int]]


@dataclass(frozen=True)
class ProfileResult:
    """A profile's outcome on a corpus at its best threshold."""

    score: float  # normalised: 0 = null detector, 100 = perfect
    raw: float
    threshold: float
    windows: int
    windows_hit: int
    false_positives: int


def probation(rows: int) -> int:
    """Leading rows of a file of ``rows`` rows that are never scored."""
    return min(math.floor(PROBATION_FRACTION * rows), PROBATION_MAX_ROWS)


def scaled_sigmoid(x: float) -> float:
    """``σ(x) = 2 / (1 + e^{5x}) - 1``, and ``-1`` for ``x > 3``."""
    if x > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


def row_values(
    rows: int, windows: Sequence[tuple[int, int]], profile: Profile
) -> tuple[np.ndarray, np.ndarray]:
    """What a detection at each row is worth under ``profile`` ``(N,)``, and the window it falls in
    ``(N,)`` (``-1``: none)."""
    value = np.empty(rows)
    window = np.full(rows, -1)
    max_tp = scaled_sigmoid(-1.0)
    prev_end: int | None = None
    prev_width = 0
    bounds = [*windows, (rows, rows)]  # a sentinel after the last window
    k = 0
    for i in range(rows):
        while i > bounds[k][1]:  # past window k
            prev_end, prev_width = bounds[k][1], bounds[k][1] - bounds[k][0] + 1
            k += 1
        first, last = bounds[k]
        if first <= i <= last and k < len(windows):
            width = last - first + 1
            value[i] = profile.tp * scaled_sigmoid(-(last - i + 1) / width) / max_tp
            window[i] = k
        elif prev_end is None:
            value[i] = -profile.fp
        else:
            value[i] = profile.fp * scaled_sigmoid(abs(i - prev_end) / max(prev_width - 1, 1))
    return value, window


def score_corpus(files: Sequence[ScoredFile], profile: Profile) -> ProfileResult:
    """The corpus's best threshold under ``profile`` and the normalised score there.

    Every scorable row of every file is a candidate detection; sweeping the threshold down through the
    distinct scores adds them in order of decreasing score: a row in a window adds (the improvement of)
    that window's best value, others add their false-positive value. The best total wins (ties: the
    higher threshold)."""
    scores, values, keys = [], [], []
    total_windows = 0
    for f in files:
        n = len(f.scores)
        start = probation(n)
        value, window = row_values(n, f.windows, profile)
        scores.append(np.asarray(f.scores, np.float64)[start:])
        values.append(value[start:])
        keys.append(np.where(window[start:] >= 0, total_windows + window[start:], -1))
        total_windows += len(f.windows)
    if not files:
        raise ValueError("no files to score")
    score = np.concatenate(scores)
    value = np.concatenate(values)
    key = np.concatenate(keys)
    order = np.argsort(-score, kind="stable")
    raw_null = -profile.fn * total_windows
    best = (raw_null, math.inf, 0, 0)  # (raw, threshold, windows hit, false positives)
    total, hit, fps = raw_null, 0, 0
    best_in_window: dict[int, float] = {}
    for rank, i in enumerate(order):
        w = int(key[i])
        if w < 0:
            total += value[i]
            fps += 1
        elif w not in best_in_window:
            best_in_window[w] = value[i]
            total += profile.fn + value[i]
            hit += 1
        elif value[i] > best_in_window[w]:
            total += value[i] - best_in_window[w]
            best_in_window[w] = value[i]
        last_of_threshold = rank + 1 == len(order) or score[order[rank + 1]] < score[i]
        if last_of_threshold and total > best[0]:
            best = (total, float(score[i]), hit, fps)
    raw, threshold, windows_hit, false_positives = best
    raw = float(raw)
    raw_perfect = profile.tp * total_windows
    normalised = 100.0 * (raw - raw_null) / (raw_perfect - raw_null) if total_windows else 0.0
    return ProfileResult(normalised, raw, threshold, total_windows, windows_hit, false_positives)


def windows_as_rows(
    timestamps: Sequence[float], windows: Sequence[tuple[float, float]]
) -> list[tuple[int, int]]:
    """Windows given as inclusive ``(start, end)`` times (seconds) → inclusive row ranges of a file whose
    rows carry ``timestamps`` (ascending); a window containing no row is dropped."""
    ts = np.asarray(timestamps, np.float64)
    rows = []
    for start, end in windows:
        first = int(np.searchsorted(ts, start, side="left"))
        last = int(np.searchsorted(ts, end, side="right")) - 1
        if first <= last:
            rows.append((first, last))
    return rows
