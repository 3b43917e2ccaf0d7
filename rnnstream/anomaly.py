"""The anomaly detector: a recurrent forecaster's surprise, calibrated online into one score per reading.

``AnomalyDetector`` (``scoring: {kind: detector}``) is a pipeline scoring stage. The engine runs the
forecaster (a GRU/LSTM bundle whose output forecasts its next input, one hidden state per stream); with a
``finetune:`` section (``schedule: inline`` for determinism) its weights keep adapting to the streams
by truncated BPTT while it serves. Inputs are standardised per stream and channel exactly as
``ForecastScoring`` does (exponentially weighted mean and variance, window ``window``).

Per reading ``x_t`` of a stream (``k``: the forecast errors seen so far, this one included):

1. **Surprise.** Per channel ``c``, the forecast error in the reading's units ``|x_c - x̂_c|`` against
   its running scale ``s_c`` (EW mean of that error, weight ``max(1/k, 1/err_window)``, taken before
   this reading), averaged over channels: ``r_t = 1 - exp(-mean_c(|x_c - x̂_c| / s_c) / temperature)``
   in [0, 1). A value outside the range seen so far by more than ``spatial_tolerance`` of that range is
   a surprise on its own: ``r_t = 1`` (after ``learn`` readings).
2. **Calibration** (Numenta's anomaly likelihood, Ahmad et al. 2017). The short-term mean
   ``m_t = mean(r_{t-S+1..t})`` (``S = short_window``) against the long-run mean ``μ`` and variance
   ``σ²`` of ``m`` (EW, weight ``max(1/k, 1/long_window)``, taken before ``m_t``; floored at
   ``μ ≥ 0.03``, ``σ² ≥ 3·10⁻⁴`` so a near-perfect forecast does not make noise look anomalous):
   ``L_t = 1 - Q((m_t - μ) / σ)`` with ``Q`` the normal tail (``Q = 1 - Q(μ - m_t)`` below the mean),
   reported on a log scale, ``score_t = ln(1 - L_t + 10⁻¹⁰) / ln(10⁻¹⁰)`` in [0, 1]: 0.5 means a
   one-in-10⁵ event. ``calibration: none`` reports ``r_t`` instead (the ablation).
3. **Records.** A score below the best the stream has had so far is multiplied by
   ``record_discount`` (0.8): a surprise no bigger than one seen before is less of an anomaly.
4. **Alerts and the refractory period.** ``alert_t = score_t ≥ threshold`` outside a refractory period;
   an alert starts ``refractory`` readings during which no alert is raised and ``anomaly_score`` is 0
   (``likelihood`` keeps the calibrated value before steps 3 and 4). NAB credits only a window's first
   detection and charges every other one.

No score before ``learn`` readings. Everything is causal (a reading's score depends on it and the
readings before it only: no file length, no min/max of the future) and deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from engine.batcher import plan_waves
from rnnstream.sensors import ForecastScoring, _normal_cdf
from rnnstream.stream_table import StreamTable

Forecaster = Literal["model", "last"]
Predicts = Literal["value", "change"]
Calibration = Literal["likelihood", "none"]

MEAN_FLOOR = 0.03  # Numenta's floors for the distribution of the short-term mean surprise
VAR_FLOOR = 3e-4
LOG_EPS = 1e-10  # score 1 at a likelihood of 1 - 1e-10
WEEK_S = 7 * 86400.0


class _Columns:
    """Hands out consecutive column ranges of a stream row."""

    def __init__(self) -> None:
        self.width = 0

    def take(self, n: int = 1) -> slice:
        cols = slice(self.width, self.width + n)
        self.width += n
        return cols


@dataclass(frozen=True)
class _Surprise:
    """The columns of one calibrated surprise: error scales (f), the short ring (S), the long-run mean
    and variance of the short mean, and how many surprises it has seen."""

    scale: slice
    ring: slice
    mean: int
    var: int
    count: int

    @classmethod
    def take(cls, cols: _Columns, channels: int, short: int) -> _Surprise:
        scale, ring = cols.take(channels), cols.take(short)
        return cls(scale, ring, cols.take().start, cols.take().start, cols.take().start)


class AnomalyDetector(ForecastScoring):
    """Forecast surprise → calibrated anomaly score → alerts (see the module docstring).

    ``forecaster: last`` ignores the model and forecasts each reading as the one before it: the naive
    baseline a user would write, kept for comparison."""

    def __init__(
        self,
        channels: list[str],
        model_norm: dict[str, float] | None = None,
        window: int = 1000,
        clip: float = 8.0,
        learn: int = 300,
        err_window: int = 1000,
        temperature: float = 4.0,
        spatial_tolerance: float | None = 0.05,
        season_s: float | None = WEEK_S,
        season_bucket_s: float = 300.0,
        short_window: int = 10,
        long_window: int = 1000,
        calibration: Calibration = "likelihood",
        record_discount: float | None = 0.8,
        threshold: float = 0.25,
        refractory: int = 200,
        forecaster: Forecaster = "model",
        predicts: Predicts = "value",
    ) -> None:
        super().__init__(channels, model_norm, window=window, clip=clip)
        self.learn, self.err_window, self.temperature = learn, err_window, temperature
        self.spatial_tolerance = spatial_tolerance
        self.short, self.long_window = short_window, long_window
        self.calibration, self.threshold, self.refractory = calibration, threshold, refractory
        self.record_discount = record_discount
        self.forecaster, self.predicts = forecaster, predicts
        f = self.f
        cols = _Columns()
        cols.take(1 + 3 * f)  # ForecastScoring's n | mean | var | pred z
        self._forecast = _Surprise.take(cols, f, short_window)
        self._cool, self._peak = cols.take().start, cols.take().start
        self._lo, self._hi = cols.take(f), cols.take(f)
        self._last = cols.take(f)  # the stream's previous readings (``predicts: change``)
        self.buckets = round(season_s / season_bucket_s) if season_s else 0
        self.bucket_s = season_bucket_s
        if self.buckets:
            self._season = _Surprise.take(cols, f, short_window)
            # the bucket of the last reading, the values one period before it (f) and whether there are
            # any; then per bucket of the period its latest values (buckets × f) and its bucket number
            self._bucket, self._past, self._has_past = cols.take().start, cols.take(f), cols.take().start
            self._ring_values, self._ring_keys = cols.take(self.buckets * f), cols.take(self.buckets)
        initial = np.zeros(cols.width)
        initial[self._lo], initial[self._hi] = math.inf, -math.inf
        if self.buckets:
            initial[self._bucket] = initial[self._ring_keys] = -1.0
        self.table = StreamTable(cols.width, initial)
        self._xs = np.zeros((0, f))
        self._ts = np.zeros(0)
        self._likelihood = np.zeros(0)

    def inputs(self, ids: list[str], xs: np.ndarray) -> np.ndarray:
        """The model's inputs: standardised readings (``predicts: value``) or standardised changes
        ``(x_t - x_{t-1}) / std`` (``predicts: change``; 0 for a stream's first reading), ``(N, f)``."""
        self._xs = np.asarray(xs, np.float64)
        z = super().inputs(ids, xs)
        if self.predicts == "value":
            return z
        idx = self.table.indices(ids)
        rows = self.table.rows
        change = np.zeros_like(self._xs)
        for wave in plan_waves(idx):
            r = idx[wave]
            first = (self._seen[wave] == 1)[:, None]
            change[wave] = np.where(
                first, 0.0, (self._xs[wave] - rows[r, self._last]) / self._before[1][wave]
            )
            rows[r, self._last] = self._xs[wave]
        np.clip(change, -self.clip, self.clip, out=change)
        return (change * self.model_std + self.model_mean).astype(np.float32)

    def documents(self, batch: Any, xs: np.ndarray, ys: np.ndarray, version: int) -> list[dict]:
        if self.forecaster == "last" or self.predicts == "change":
            # the next reading in this one's z units after it: this one (last), plus the forecast change
            z_next = (self._xs - self._after[0]) / self._after[1]
            if self.forecaster == "model":
                z_next = z_next + (ys.astype(np.float64) - self.model_mean) / self.model_std
            ys = (z_next * self.model_std + self.model_mean).astype(np.float32)
        self._ts = np.array([math.nan if it[3].ts is None else float(it[3].ts) for it in batch.items])
        self._likelihood = np.zeros(len(batch.ids))
        docs = super().documents(batch, xs, ys, version)
        for doc, lik in zip(docs, self._likelihood.tolist(), strict=True):
            doc["likelihood"] = lik
        return docs

    def _score(
        self, r: np.ndarray, err: np.ndarray, n: np.ndarray, wave: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and alerts of one wave's rows ``r`` ``(W,)`` with readings seen ``n (W,)`` (this one
        included); updates the rows. (``err``, the error in standard deviations, is not used: the
        surprise is measured in the readings' units.)"""
        rows = self.table.rows
        x = self._xs[wave]
        learned = n > self.learn
        has_error = n > 1  # nothing was forecast for a stream's first reading
        _, _, pred_c, _ = self._cols()
        predicted = rows[r, pred_c] * self._before[1][wave] + self._before[0][wave]  # raw units
        raw = self._surprise(self._forecast, r, np.abs(x - predicted), has_error)
        if self.spatial_tolerance is not None:
            lo, hi = rows[r, self._lo], rows[r, self._hi]
            margin = self.spatial_tolerance * (hi - lo)
            outside = ((x > hi + margin) | (x < lo - margin)).any(axis=1)
            raw = np.where(learned & outside, 1.0, raw)
            rows[r, self._lo], rows[r, self._hi] = np.minimum(lo, x), np.maximum(hi, x)
        likelihood = self._calibrated(self._forecast, r, raw, has_error)
        if self.buckets:
            past, has_past = self._period_ago(r, x, self._ts[wave])
            seasonal = self._surprise(self._season, r, np.abs(x - past), has_past)
            likelihood = np.maximum(likelihood, self._calibrated(self._season, r, seasonal, has_past))
        likelihood = np.where(learned, likelihood, 0.0)
        self._likelihood[wave] = likelihood
        score = likelihood
        if self.record_discount is not None:  # no bigger than one seen before: discounted
            peak = rows[r, self._peak]
            score = np.where(likelihood < peak, self.record_discount * likelihood, likelihood)
            rows[r, self._peak] = np.maximum(peak, likelihood)
        cooling = rows[r, self._cool] > 0
        alert = ~cooling & (score >= self.threshold)
        rows[r, self._cool] = np.where(alert, self.refractory, np.maximum(rows[r, self._cool] - 1, 0))
        return np.where(cooling, 0.0, score), alert

    def _surprise(self, c: _Surprise, r: np.ndarray, err: np.ndarray, active: np.ndarray) -> np.ndarray:
        """``r_t`` for the ``active`` rows: each channel's error ``err (W, f)`` (readings' units) against
        its running scale, averaged over channels and squashed into [0, 1); updates the scales and
        counts."""
        rows = self.table.rows
        k = rows[r, c.count] + active  # surprises seen, this one included
        rows[r, c.count] = k
        scale = rows[r, c.scale]
        with np.errstate(over="ignore"):  # an error far beyond a tiny scale: ratio inf, surprise 1
            ratio = np.where(scale > 0, err / np.maximum(scale, 1e-300), np.where(err > 0, math.inf, 0.0))
        raw = np.where(active & (k > 1), 1.0 - np.exp(-ratio.mean(axis=1) / self.temperature), 0.0)
        alpha = (1.0 / np.maximum(k, 1.0)).clip(min=1.0 / self.err_window)[:, None]
        rows[r, c.scale] = np.where(active[:, None], scale + alpha * (err - scale), scale)
        return raw

    def _calibrated(self, c: _Surprise, r: np.ndarray, raw: np.ndarray, active: np.ndarray) -> np.ndarray:
        """The score of surprises ``raw (W,)``: their log-scaled anomaly likelihood (``calibration:
        none``: ``raw`` itself); updates the statistics of the ``active`` rows."""
        rows = self.table.rows
        k = np.maximum(rows[r, c.count], 1.0)  # _surprise counted this one
        if self.calibration == "none":
            return np.where(active & (k >= self.learn), raw, 0.0)
        ring = rows[r, c.ring]
        slot = ((k - 1) % self.short).astype(np.int64)
        ring[np.arange(len(r)), slot] = raw
        short_mean = ring.sum(axis=1) / np.minimum(k, self.short)
        mu, var = rows[r, c.mean], rows[r, c.var]
        sd = np.sqrt(np.maximum(var, VAR_FLOOR))
        tail = 1.0 - _normal_cdf(np.abs(short_mean - np.maximum(mu, MEAN_FLOOR)) / sd)
        tail = np.where(short_mean >= np.maximum(mu, MEAN_FLOOR), tail, 1.0 - tail)
        score = np.clip(np.log(tail + LOG_EPS) / math.log(LOG_EPS), 0.0, 1.0)
        alpha = np.maximum(1.0 / k, 1.0 / self.long_window)
        delta = short_mean - mu
        rows[r, c.ring] = np.where(active[:, None], ring, rows[r, c.ring])
        rows[r, c.mean] = np.where(active, mu + alpha * delta, mu)
        rows[r, c.var] = np.where(active, (1 - alpha) * (var + alpha * delta * delta), var)
        return np.where(active & (k >= self.learn), score, 0.0)  # each surprise learns its own statistics

    def _period_ago(self, r: np.ndarray, x: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The readings one period (``season_s``) before ``x (W, f)`` at times ``ts (W,)`` (seconds), to the
        bucket, and whether there are any; records ``x``. The buckets of the last period are a ring of
        ``buckets`` slots per stream; a slot holds the latest readings of its bucket and the bucket's
        number, so a slot last written one period ago holds the readings to compare with."""
        rows = self.table.rows
        f, b = self.f, self.buckets
        ok = np.isfinite(ts)
        key = np.where(ok, np.floor(np.where(ok, ts, 0.0) / self.bucket_s), -1.0)
        slot = (key % b).astype(np.int64)
        new_bucket = ok & (key != rows[r, self._bucket])
        value_cols = self._ring_values.start + slot[:, None] * f + np.arange(f)[None, :]
        key_cols = self._ring_keys.start + slot
        if new_bucket.any():  # entering a bucket: fetch what its slot holds before overwriting it
            had = rows[r, key_cols] == key - b
            rows[r, self._past] = np.where(
                new_bucket[:, None], rows[r[:, None], value_cols], rows[r, self._past]
            )
            rows[r, self._has_past] = np.where(new_bucket, had, rows[r, self._has_past])
            rows[r, self._bucket] = np.where(new_bucket, key, rows[r, self._bucket])
        has_past = ok & (rows[r, self._has_past] > 0)
        past = rows[r, self._past]
        rows[r[ok, None], value_cols[ok]] = x[ok]
        rows[r[ok], key_cols[ok]] = key[ok]
        return past, has_past
