"""Offline training of a next-step forecaster (``nn.RNN/GRU/LSTM`` + ``nn.Linear``) for the shipped assets:
Adam with a one-cycle schedule, gradient clipping, shuffled mini-batches of whole sequences. Used by the
training scripts in ``scripts/``; deterministic for a given seed and thread count."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Loss = Callable[[Tensor, Tensor], Tensor]


def fit_forecaster(
    rnn: nn.RNNBase,
    head: nn.Linear,
    inputs: Tensor,
    targets: Tensor,
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    warmup: int = 0,
    loss_fn: Loss = nn.functional.mse_loss,
) -> float:
    """Fit ``head(rnn(inputs))`` to ``targets``; returns the last batch's loss.

    inputs: ``(T, N, in)`` time-major float32; targets: ``(T, N, out)``; the first ``warmup`` steps of
    each sequence are left out of the loss (the model needs them to lock on)."""
    torch.manual_seed(seed)
    params = [*rnn.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    n = inputs.shape[1]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * (n // batch))
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch + 1, batch):
            idx = order[start : start + batch]
            out, _ = rnn(inputs[:, idx])
            loss = loss_fn(head(out[warmup:]), targets[warmup:, idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.5f} (standardised units)", flush=True)
    return float(loss.item())
