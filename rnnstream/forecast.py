"""Forecast rollouts in the pipeline's output documents (the ``forecast: {horizon: H}`` config section).

After a batch is stepped, each output document of a stream also carries ``"forecasts"``: the model's next
``H`` outputs from the stream's state after that message (``Engine.forecast_many``: each output fed back
as the next input; the stream's state is not changed), ``H`` rows, in the units of the document:

- ``scoring: raw``: the model's own units, those of ``"y"`` (``forecasts[0]`` is the message's last
  ``y`` row): ``[[out_0, ...], ...]``, ``H × out``;
- ``scoring: forecast`` (and ``detector`` with ``predicts: value``): raw reading units, like the
  document's ``"forecast"`` (which is ``forecasts[0]``): the model's normalised values mapped back through
  its training normalisation (``features["normalisation"]``) and the stream's running mean and deviation
  after the reading, ``x̂ = (ŷ - m_model) / s_model · std + mean``; one value per step (one channel) or
  ``{channel: value}`` per step. The rollout feeds the model its own normalised outputs as they are (the
  online inputs are clipped to ±``clip`` deviations; a forecast is not).

Other scorings are refused when the pipeline is built: their outputs are not readings to forecast.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine import Engine
from models.rollout import check_forecastable, check_horizon
from models.stream_model import StreamModel
from rnnstream.pipeline import Batch, RawOutputs
from rnnstream.sensors import ForecastScoring

FORECAST_KEY = "forecasts"


class Forecaster:
    """Adds ``"forecasts"`` to a batch's documents (module docstring). ``scoring``: the pipeline's."""

    def __init__(self, engine: Engine, horizon: int, scoring: Any) -> None:
        check_forecast_setup(engine.model, scoring)
        self.engine = engine
        self.horizon = check_horizon(horizon)
        self.scoring = scoring
        self.readings = isinstance(scoring, ForecastScoring)

    @staticmethod
    def rounds(batch: Batch) -> list[Batch]:
        """``batch`` cut into rounds where each stream has at most one message: round ``r`` holds every
        stream's ``r``-th message, so each stream's messages keep their order (one round: ``[batch]``)."""
        seen: dict[str, int] = {}
        out: list[Batch] = []
        for msg, sid, _n, decoded in batch.items:
            r = seen.get(sid, 0)
            seen[sid] = r + 1
            if r == len(out):
                out.append(Batch())
            out[r].add(msg, sid, decoded)
        return out if len(out) > 1 else [batch]

    def add(self, items: list[tuple[Any, str, int, Any]], docs: list[dict | None]) -> None:
        """Give each document of ``items`` (the batch's messages; each stream at most once, so each
        stream's state is the one after its message) its ``"forecasts"``."""
        wanted = [(k, sid) for k, ((_, sid, _, _), doc) in enumerate(zip(items, docs, strict=True)) if doc]
        if not wanted:
            return
        rollouts = self.engine.forecast_many([sid for _, sid in wanted], self.horizon)
        if self.readings:
            last_rows = np.cumsum([n for _, _, n, _ in items]) - 1  # each message's last timestep
            values = self._in_reading_units(rollouts, last_rows[[k for k, _ in wanted]])
        else:
            values = rollouts.tolist()
        for (k, _), value in zip(wanted, values, strict=True):
            docs[k][FORECAST_KEY] = value

    def _in_reading_units(self, rollouts: np.ndarray, rows: np.ndarray) -> list:
        """``rollouts (M, H, channels)`` in the model's normalisation → raw reading units with the running
        statistics after the batch rows ``rows (M,)`` (``ForecastScoring``'s, kept for its documents)."""
        s = self.scoring
        mean, std = s._after[0][rows][:, None, :], s._after[1][rows][:, None, :]
        raw = (rollouts.astype(np.float64) - s.model_mean) / s.model_std * std + mean
        if s.f == 1:
            return raw[:, :, 0].tolist()
        return [[dict(zip(s.channels, step, strict=True)) for step in steps] for steps in raw.tolist()]


def check_forecast_setup(model: StreamModel, scoring: Any) -> None:
    """Raise ``ValueError`` unless ``model`` can be rolled out (``check_forecastable``) and ``scoring``'s
    documents have units to give the forecasts in (module docstring)."""
    check_forecastable(model)
    if isinstance(scoring, ForecastScoring):
        if (
            getattr(scoring, "predicts", "value") != "value"
            or getattr(scoring, "forecaster", "model") != "model"
        ):
            raise ValueError(
                "forecast: needs a model forecasting the next value (the detector's predicts: change "
                "and forecaster: last are not rolled out)"
            )
    elif type(scoring) is not RawOutputs:
        kind = type(scoring).__name__
        raise ValueError(f"forecast: works with scoring raw, forecast or detector (value), not {kind}")
