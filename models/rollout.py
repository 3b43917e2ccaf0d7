"""Forecasting rollouts (one-to-many): a model that predicts its own next input, run ahead of its data.

From a stream's state ``s_t`` (after its last event ``x_t``), the rollout of ``horizon`` steps is::

    ŷ_1 = head(h_top(s_t))                  # the model's output for x_t: its forecast of x_{t+1}
    ŷ_k, s_{t+k-1} = step(ŷ_{k-1}, s_{t+k-2})   for k = 2 .. horizon   (s_{t+0} = s_t)

that is, each forecast is fed back as the next input. This is exactly the offline torch rollout: the
module over the history (its last output is ``ŷ_1``), then the module stepped on its own predictions. The
state the rollout steps is a copy: the stream's own state is not touched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.stream_model import StreamModel

MAX_HORIZON = 10_000
"""The longest rollout one call may ask for (a bound on the work and memory one request can cost)."""


class NotForecastableError(ValueError):
    """The model cannot forecast its own inputs: its output is not in its input space."""


def check_forecastable(model: StreamModel) -> None:
    """Raise ``NotForecastableError`` unless ``model``'s output can be fed back as its next input: float
    inputs (not categorical ids), ``output_size == feature_size``, stepped one event at a time."""
    if model.categorical:
        raise NotForecastableError(
            "forecast needs a model whose outputs are its next inputs; this one takes categorical ids "
            "(an embedding): use decode with an encoder-decoder model instead"
        )
    if model.output_size != model.feature_size:
        raise NotForecastableError(
            f"forecast feeds each output back as the next input: the model's output_size "
            f"({model.output_size}) must equal its feature_size ({model.feature_size})"
        )
    if model.spec.utterance_frames:
        raise NotForecastableError("an utterance model gives no per-event outputs to feed back")


def check_horizon(horizon: object) -> int:
    """``horizon`` as an int in ``[1, MAX_HORIZON]``, else ``ValueError`` naming the bound."""
    if isinstance(horizon, bool) or not isinstance(horizon, int) or not 1 <= horizon <= MAX_HORIZON:
        raise ValueError(f"horizon must be an int in [1, {MAX_HORIZON}], got {horizon!r}")
    return horizon


def rollout(model: StreamModel, state: list[Tensor], horizon: int) -> Tensor:
    """The next ``horizon`` outputs of ``B`` streams from their states (module docstring).

    state: flat list, each ``(B, width)`` (stepped as a copy: the tensors given are not changed).
    Returns ``(B, horizon, output_size)`` float32, in the model's output units (= its input units).
    """
    y = model.end_output(state)
    outputs = [y]
    for _ in range(horizon - 1):
        y, state = model.step(y, state)
        outputs.append(y)
    return torch.stack(outputs, dim=1)
