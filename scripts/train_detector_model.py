"""Train the anomaly detector's generic forecaster: ``models/assets/detector_gru.safetensors``.

``nn.GRU(1, 32)`` → ``nn.Linear(32, 1)`` reads one change per event, ``(x_t - x_{t-1}) / std``, with the
running standard deviation the detector stage keeps (``rnnstream.anomaly``: exponentially weighted, weight
``max(1/n, 1/window)``; clipped to ±``clip``), and forecasts the next change in the same units: the
detector's forecast is the last reading plus that change, so a model with nothing to add is the naive
last-value forecast. It is
trained on synthetic signals only (no benchmark data): sums of sines, square and sawtooth waves, random
walks, AR(1) noise, level shifts, counts, flat lines and rare spikes, with random periods, amplitudes
and noise. It is the frozen, generic starting point; the detector adapts it to each deployment online.

Deterministic for a given ``--seed``; about two minutes on 2 CPU cores.

    python scripts/train_detector_model.py [--seed 0] [--out models/assets/detector_gru.safetensors]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import models
from models.fit import fit_forecaster

DEFAULT_OUT = Path(models.__file__).parent / "assets" / "detector_gru.safetensors"
HIDDEN = 32
WINDOW = 1000  # the detector's default normalisation window (``scoring.window``)
CLIP = 8.0


@dataclass
class TrainConfig:
    seed: int = 0
    num_sequences: int = 4096
    length: int = 400
    batch: int = 128
    epochs: int = 12
    lr: float = 5e-3
    threads: int = 2


def synthetic_signals(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, length)`` float64 signals, each the sum of one or two random components."""
    t = np.arange(length, dtype=np.float64)
    out = np.zeros((n, length))
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            out[i] += _component(t, rng)
        out[i] = out[i] * 10 ** rng.uniform(-2, 3) + rng.normal(0, 100)
    return out


def _component(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    length = len(t)
    period = rng.uniform(8, 400)
    phase = rng.uniform(0, 2 * np.pi)
    noise = rng.normal(0, 10 ** rng.uniform(-3, -1), length)
    kind = rng.integers(0, 8)
    if kind == 0:
        x = np.sin(2 * np.pi * t / period + phase)
    elif kind == 1:
        x = np.sign(np.sin(2 * np.pi * t / period + phase))
    elif kind == 2:
        x = ((t / period + phase) % 1.0) * 2 - 1
    elif kind == 3:
        x = np.cumsum(rng.normal(0, 1, length)) / 10
    elif kind == 4:
        phi = rng.uniform(0.9, 0.999)
        x = np.zeros(length)
        e = rng.normal(0, 1, length)
        for k in range(1, length):
            x[k] = phi * x[k - 1] + e[k]
    elif kind == 5:
        shifts = rng.random(length) < rng.uniform(0.001, 0.02)
        x = np.cumsum(shifts * rng.normal(0, 1, length))
    elif kind == 6:
        x = rng.poisson(rng.uniform(0.2, 20), length).astype(np.float64) / 10
    else:
        x = np.zeros(length)
    spikes = rng.random(length) < rng.choice([0.0, 0.002])
    return x + noise + spikes * rng.normal(0, 5, length)


def standardised_changes(x: np.ndarray) -> np.ndarray:
    """``(n, T)``: each reading's change ``(x_t - x_{t-1}) / std_t``, with ``std_t`` the running standard
    deviation of the readings before it, as ``rnnstream.anomaly.AnomalyDetector.inputs`` computes it (0 for
    the first reading; clipped to ±``CLIP``)."""
    n, length = x.shape
    change = np.zeros_like(x)
    mean, var = x[:, 0].copy(), np.zeros(n)
    for k in range(1, length):
        std = np.maximum(np.sqrt(np.maximum(var, 0)), 1e-3 * np.abs(mean) + 1e-6)
        change[:, k] = (x[:, k] - x[:, k - 1]) / std
        alpha = max(1.0 / (k + 1), 1.0 / WINDOW)
        delta = x[:, k] - mean
        mean, var = mean + alpha * delta, (1 - alpha) * (var + alpha * delta * delta)
    return np.clip(change, -CLIP, CLIP)


def train(cfg: TrainConfig) -> tuple[nn.GRU, nn.Linear, float]:
    """Fit GRU + head to forecast each next standardised change; returns them and the last loss."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    change = standardised_changes(synthetic_signals(cfg.num_sequences, cfg.length, rng))
    data = torch.from_numpy(change.astype(np.float32)).T.unsqueeze(-1).contiguous()  # (T, N, 1)
    gru, head = nn.GRU(1, HIDDEN), nn.Linear(HIDDEN, 1)
    # the first change is always 0 (no reading before it): learn from the second on
    loss = fit_forecaster(
        gru,
        head,
        data[1:-1],
        data[2:],
        epochs=cfg.epochs,
        batch=cfg.batch,
        lr=cfg.lr,
        seed=cfg.seed,
        loss_fn=nn.functional.huber_loss,
    )
    return gru, head, loss


def build_model(gru: nn.GRU, head: nn.Linear, loss: float, cfg: TrainConfig) -> models.StreamModel:
    model = models.from_torch(gru, head=head, head_kind="regression")
    model.info.version = 1
    model.info.features = {
        "kind": "sensor",
        "features": 1,
        "input": f"the change of a reading from the one before, over the running std (EW window {WINDOW}, "
        f"clip ±{CLIP})",
        "output": "forecast of the stream's next change, in the same units",
        "predicts": "change",
        "normalisation": {"mean": 0.0, "std": 1.0},
    }
    model.info.trained_on = {
        "script": "scripts/train_detector_model.py",
        "data": "synthetic signals (train_detector_model.synthetic_signals)",
        **asdict(cfg),
        "loss": "huber on the next standardised change",
        "final_loss": round(loss, 6),
    }
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    cfg = TrainConfig(seed=args.seed)
    started = time.perf_counter()
    gru, head, loss = train(cfg)
    path = models.save_bundle(build_model(gru, head, loss, cfg), args.out)
    took = time.perf_counter() - started
    print(f"saved {path} ({path.stat().st_size} bytes) in {took:.1f} s; final huber {loss:.5f}")


if __name__ == "__main__":
    main()
