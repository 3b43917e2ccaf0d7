"""Truncated backpropagation through time, TBPTT(k1, k2), for a ``StreamModel``.

Every ``k1`` new timesteps, the model is re-run over the last ``k2`` inputs (``k2 >= k1``) from the
state it had ``k2`` steps ago — that state is a constant (detached): gradients stop there — and the loss
of the last ``k1`` outputs is backpropagated through all ``k2`` steps. The first ``k2 - k1`` steps only
warm the state up for the loss window, which is what lets the gradient see ``k2`` steps of history while
each update pays for ``k2`` steps, not the whole stream.

Shapes: ``T = k2`` steps, ``B`` streams, ``F`` features. ``state`` is the model's flat state list.
This module holds the math of one update; the background fine-tuning worker (replay buffer, optimiser,
validation, publishing) builds on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from models.stream_model import StreamModel

Loss = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class TBPTT:
    """``k1``: steps between updates (and in the loss); ``k2``: steps backpropagated through."""

    k1: int
    k2: int

    def __post_init__(self) -> None:
        if not 1 <= self.k1 <= self.k2:
            raise ValueError(f"TBPTT needs 1 <= k1 <= k2, got k1={self.k1}, k2={self.k2}")

    def loss(
        self, model: StreamModel, start_state: list[Tensor], xs: Tensor, targets: Tensor, loss_fn: Loss
    ) -> tuple[Tensor, list[Tensor]]:
        """The update's loss (differentiable in the model's parameters) and the final state (detached).

        start_state: state before ``xs[0]``; xs: ``(k2, B, F)`` (or ``(k2, B)`` ids); targets: what the last
        ``k1`` outputs should be, ``(k1, B, ...)`` as ``loss_fn(outputs, targets)`` expects.
        """
        if xs.shape[0] != self.k2:
            raise ValueError(f"expected {self.k2} timesteps, got {xs.shape[0]}")
        if targets.shape[0] != self.k1:
            raise ValueError(f"expected targets for the last {self.k1} timesteps, got {targets.shape[0]}")
        state = [s.detach() for s in start_state]  # the truncation: no gradient flows past the window
        outputs, final = model(xs, state)
        return loss_fn(outputs[-self.k1 :], targets), [s.detach() for s in final]

    def step(
        self,
        model: StreamModel,
        optimiser: torch.optim.Optimizer,
        start_state: list[Tensor],
        xs: Tensor,
        targets: Tensor,
        loss_fn: Loss,
        max_grad_norm: float | None = 1.0,
    ) -> tuple[float, float]:
        """One update: zero grads, backward, clip by norm, optimiser step. Returns ``(loss, grad norm
        before clipping)``; a non-finite loss or gradient skips the optimiser step."""
        optimiser.zero_grad(set_to_none=True)
        loss, _ = self.loss(model, start_state, xs, targets, loss_fn)
        return apply_update(model, optimiser, loss, max_grad_norm)


def apply_update(
    model: torch.nn.Module, optimiser: torch.optim.Optimizer, loss: Tensor, max_grad_norm: float | None
) -> tuple[float, float]:
    """Backward ``loss`` (grads zeroed by the caller), clip by norm, optimiser step. Returns ``(loss, grad
    norm before clipping)``; a non-finite loss or gradient skips the optimiser step."""
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    if torch.isfinite(loss) and torch.isfinite(norm):
        optimiser.step()
    return float(loss.detach()), float(norm)
