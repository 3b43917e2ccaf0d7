"""Sensor pipelines: checks of timestamped readings, and a forecaster's error turned into an anomaly score.

``ReadingGuard`` (the ``readings:`` config section) sees every decoded reading before the engine:

| case | what happens | counter |
|---|---|---|
| timestamp equal to the stream's last one | rejected (a redelivery: MQTT QoS 1 dedup) | ``duplicate`` |
| timestamp before the stream's last one | rejected | ``out_of_order`` |
| gap longer than ``max_gap_s`` | accepted, reported; ``on_gap: reset`` restarts the state | ``gap`` |
| ``flatline_after`` identical readings in a row | accepted, reported once per run | ``flatline`` |
| no timestamp | stamped with the arrival time (wall clock) | ``stamped`` |

Missing, non-numeric or absurd values and channels that appear or disappear are rejected earlier, by
the decoder (``connectors.readings``). Rejections and reports go to the dead letters with the reason.

``ForecastScoring`` (``scoring: {kind: forecast}``) serves a next-value forecaster such as the shipped
sensor LSTM. Per stream and channel it keeps an exponentially weighted mean ``m`` and variance ``v`` of
the raw values (weight ``max(1/n, 1/window)`` after ``n`` readings, so the first ``window`` readings are
a plain running mean) and feeds the model ``z = (x - m) / sqrt(v)`` (clipped to ±``clip``), mapped into
the model's training normalisation. For each reading:

- ``prediction``: what the model forecast for this reading from the readings before it (raw units;
  ``null`` for a stream's first reading);
- ``error``: ``mean_channels |z - ẑ|``, the forecast error in standard deviations;
- ``anomaly_score``: ``Φ((s - μ) / σ)``, the normal tail probability of the short-term mean error ``s``
  (weight ``1/short_window``) against the long-run mean ``μ`` and deviation ``σ`` of the error (weight
  ``max(1/k, 1/long_window)``), in [0, 1] (0 during the first ``warmup`` readings);
- ``alert``: ``anomaly_score >= threshold``, then no alert for ``refractory`` readings;
- ``forecast``: the forecast of the next reading (raw units).

Everything is causal: a reading's score depends on that reading and the ones before it only.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
import torch

from connectors.codec import Decoded
from engine.batcher import plan_waves
from rnnstream.stream_table import StreamDict, StreamTable

GapPolicy = Literal["keep", "reset"]


class ReadingGuard:
    """Per-stream checks of readings with ``channels`` values. Row: ``[last ts, identical run, last
    values (channels)]``."""

    def __init__(
        self,
        channels: int,
        max_gap_s: float | None = None,
        on_gap: GapPolicy = "keep",
        flatline_after: int | None = 100,
    ) -> None:
        initial = np.concatenate([[math.nan, 0.0], np.full(channels, math.nan)])
        self.table = StreamDict(2 + channels, initial)
        self.max_gap_s = max_gap_s
        self.on_gap = on_gap
        self.flatline_after = flatline_after
        self._counts = dict.fromkeys(("duplicate", "out_of_order", "gap", "flatline", "stamped"), 0)

    def counters(self) -> dict[str, int]:
        return dict(self._counts)

    def check(self, stream_id: str, decoded: Decoded) -> tuple[bool, list[str], bool]:
        """``(accepted, notices, reset state first)`` for one reading (see the module table)."""
        if decoded.ts is None:
            decoded.ts = time.time()
            self._counts["stamped"] += 1
        ts = float(decoded.ts)
        row = self.table.row(stream_id)
        last = row[0]
        if ts <= last:  # False while last is NaN (no reading yet)
            kind = "duplicate" if ts == last else "out_of_order"
            self._counts[kind] += 1
            what = "duplicate timestamp" if ts == last else "out of order: timestamp before"
            return False, [f"{what} {ts!r} (stream's last reading at {last!r})"], False
        notices: list[str] = []
        reset = False
        if self.max_gap_s is not None and ts - last > self.max_gap_s:
            self._counts["gap"] += 1
            reset = self.on_gap == "reset"
            action = "state reset" if reset else "state kept"
            gap = f"gap of {ts - last:.6g} s after the last reading (max_gap_s {self.max_gap_s})"
            notices.append(f"{gap}; {action}")
        values = decoded.xs[0]  # plain floats: cheaper to compare than arrays for a few channels
        run = row[1] + 1 if values == row[2:] else 0.0
        if self.flatline_after is not None and run + 1 == self.flatline_after:
            self._counts["flatline"] += 1
            notices.append(f"flat line: {self.flatline_after} identical readings in a row")
        row[0], row[1], row[2:] = ts, run, list(values)
        return True, notices, reset


class ForecastScoring:
    """Online normalisation in, anomaly scores out, for a model forecasting its next input (see the module
    docstring). ``model_norm``: the model's training normalisation ``{"mean", "std"}`` (its bundle's
    ``features["normalisation"]``), or ``None`` when it takes standardised values as they are."""

    dtype = np.float64  # raw readings as decoded, unrounded in the documents

    def __init__(
        self,
        channels: list[str],
        model_norm: dict[str, float] | None = None,
        window: int = 1000,
        clip: float = 8.0,
        warmup: int = 20,
        short_window: int = 1,
        long_window: int = 2000,
        threshold: float = 0.999,
        refractory: int = 50,
    ) -> None:
        self.channels = channels
        f = len(channels)
        self.f = f
        self.model_mean = float(model_norm["mean"]) if model_norm else 0.0
        self.model_std = float(model_norm["std"]) if model_norm else 1.0
        self.window, self.clip, self.warmup = window, clip, warmup
        self.short_alpha, self.long_window = 1.0 / short_window, long_window
        self.threshold, self.refractory = threshold, refractory
        # row: n | mean (f) | var (f) | pred z (f) | err mean | err var | err short | cooldown
        self.table = StreamTable(1 + 3 * f + 4)
        # per reading of the batch in flight, from ``inputs`` to ``documents``
        self._z = self._seen = np.zeros(0)
        self._before = self._after = (np.zeros(0), np.zeros(0))  # (mean, std) (N, channels)

    # column slices of a row
    def _cols(self) -> tuple[slice, slice, slice, int]:
        f = self.f
        return slice(1, 1 + f), slice(1 + f, 1 + 2 * f), slice(1 + 2 * f, 1 + 3 * f), 1 + 3 * f

    def inputs(self, ids: list[str], xs: np.ndarray) -> np.ndarray:
        """Model inputs for raw readings ``xs (N, channels)``: standardised per stream, then put into the
        model's normalisation. Updates the value statistics, and keeps for ``documents`` the statistics
        each reading was standardised with and those after it."""
        idx = self.table.indices(ids)  # first: new streams may grow (reallocate) the rows
        rows = self.table.rows
        mean_c, var_c, _, _ = self._cols()
        shape = xs.shape
        z, self._seen = np.zeros(shape), np.zeros(len(ids))
        self._before, self._after = (np.zeros(shape), np.ones(shape)), (np.zeros(shape), np.ones(shape))
        for wave in plan_waves(idx):
            r = idx[wave]
            x = xs[wave].astype(np.float64)
            n = rows[r, 0:1]
            mean, var = rows[r, mean_c], rows[r, var_c]
            std = _std(mean, var)
            z[wave] = np.where(n > 0, (x - mean) / std, 0.0)
            alpha = np.maximum(1.0 / (n + 1), 1.0 / self.window)
            delta = x - mean
            new_mean, new_var = mean + alpha * delta, (1 - alpha) * (var + alpha * delta * delta)
            rows[r, mean_c], rows[r, var_c] = new_mean, new_var
            rows[r, 0] += 1
            self._seen[wave] = rows[r, 0]
            self._before[0][wave], self._before[1][wave] = mean, std
            self._after[0][wave], self._after[1][wave] = new_mean, _std(new_mean, new_var)
        np.clip(z, -self.clip, self.clip, out=z)
        self._z = z
        return (z * self.model_std + self.model_mean).astype(np.float32)

    def documents(self, batch: Any, xs: np.ndarray, ys: np.ndarray, version: int) -> list[dict]:
        """One document per reading of ``batch`` (one timestep each) from raw ``xs (N, channels)`` and the
        model's next-value forecasts ``ys (N, channels)``."""
        ids = batch.ids
        idx = self.table.indices(ids)
        rows = self.table.rows
        _, _, pred_c, _ = self._cols()
        n_out = len(ids)
        prediction = np.zeros((n_out, self.f))
        forecast = np.zeros((n_out, self.f))
        error = np.zeros(n_out)
        score = np.zeros(n_out)
        alert = np.zeros(n_out, bool)
        pred_next = (ys.astype(np.float64) - self.model_mean) / self.model_std
        for wave in plan_waves(idx):
            r = idx[wave]
            n = self._seen[wave]  # readings seen, this one included
            pred = rows[r, pred_c]
            prediction[wave] = pred * self._before[1][wave] + self._before[0][wave]
            err = np.where(n > 1, np.abs(self._z[wave] - pred).mean(axis=1), 0.0)
            error[wave] = err
            score[wave], alert[wave] = self._score(r, err, n, wave)
            rows[r, pred_c] = pred_next[wave]
            forecast[wave] = pred_next[wave] * self._after[1][wave] + self._after[0][wave]
        return self._docs(batch, xs, prediction, forecast, error, score, alert, version)

    def _score(
        self, r: np.ndarray, err: np.ndarray, n: np.ndarray, wave: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly scores and alerts of one wave's rows ``r`` (the batch's readings ``wave``); updates the
        error statistics."""
        rows = self.table.rows
        e0 = 1 + 3 * self.f
        mu, var, short, cool = rows[r, e0], rows[r, e0 + 1], rows[r, e0 + 2], rows[r, e0 + 3]
        short = short + self.short_alpha * (err - short)
        score = _normal_cdf((short - mu) / np.sqrt(var + 1e-12))
        scored = n > self.warmup
        score = np.where(scored, score, 0.0)
        alert = scored & (score >= self.threshold) & (cool <= 0)
        k = np.maximum(n - 1, 1)
        alpha = np.maximum(1.0 / k, 1.0 / self.long_window)
        delta = err - mu
        rows[r, e0] = mu + alpha * delta
        rows[r, e0 + 1] = (1 - alpha) * (var + alpha * delta * delta)
        rows[r, e0 + 2] = short
        rows[r, e0 + 3] = np.where(alert, self.refractory, np.maximum(cool - 1, 0))
        return score, alert

    def _docs(self, batch, xs, prediction, forecast, error, score, alert, version) -> list[dict]:
        """The documents, built from plain Python values (one ``tolist`` per array, not one numpy
        scalar per field)."""
        names = self.channels
        first = (self._seen == 1).tolist()  # nothing was forecast for a stream's first reading
        if self.f == 1:
            values, preds, fcs = xs[:, 0].tolist(), prediction[:, 0].tolist(), forecast[:, 0].tolist()
        else:
            values, preds, fcs = (
                [dict(zip(names, row, strict=True)) for row in a.tolist()] for a in (xs, prediction, forecast)
            )
        columns = (values, preds, fcs, first, error.tolist(), score.tolist(), alert.tolist())
        rows = zip(batch.items, *columns, strict=True)
        return [
            {
                "ts": item[3].ts,
                "value": value,
                "prediction": None if is_first else pred,
                "error": err,
                "anomaly_score": sc,
                "alert": al,
                "forecast": fc,
                "model_version": version,
            }
            for item, value, pred, fc, is_first, err, sc, al in rows
        ]


def _std(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Standard deviation with a floor, so a flat signal does not blow up its standardised values."""
    return np.maximum(np.sqrt(np.maximum(var, 0.0)), 1e-3 * np.abs(mean) + 1e-6)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    """Φ(z), the standard normal distribution function, elementwise."""
    return torch.special.ndtr(torch.from_numpy(np.asarray(z, np.float64))).numpy()
