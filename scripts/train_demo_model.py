"""Train the demo's sensor forecaster and save it as ``models/assets/sensor_lstm.safetensors``.

The model reads one standardised sensor value per event and predicts the stream's next value, in raw
sensor units: ``nn.LSTM(1, 32)`` → ``nn.Linear(32, 1)``, trained with plain torch on
``connectors.simulate_sequences`` data, then imported with ``models.from_torch(..., head_kind="regression")``
whose head turns the standardised prediction back into sensor units (``y * std + mean``).

Inputs carry the simulator's spikes (at 10x the demo's rate); targets are the spike-free next readings,
so the model learns to forecast through an anomaly instead of echoing it. Deterministic for a given
``--seed`` (same weights); about 10 s on 2 idle CPU cores.

    python scripts/train_demo_model.py [--seed 0] [--out models/assets/sensor_lstm.safetensors]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import models
from connectors.simulated import SensorSequences, simulate_sequences
from models.fit import fit_forecaster

DEFAULT_OUT = Path(models.__file__).parent / "assets" / "sensor_lstm.safetensors"
HIDDEN = 32
WARMUP = 8
"""Leading timesteps left out of the loss: the model needs a few samples to lock onto a sine."""


@dataclass
class TrainConfig:
    seed: int = 0
    num_sequences: int = 2048
    length: int = 200
    batch: int = 64
    epochs: int = 30
    lr: float = 1e-2
    anomaly_prob: float = 0.02
    """Spike rate in the training inputs, 10x the demo's: enough spikes to learn to look through them."""
    threads: int = 2


def standardise(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of all training values (sensor units), rounded for the metadata."""
    return round(float(values.mean()), 4), round(float(values.std()), 4)


def make_tensors(seqs: SensorSequences, mean: float, std: float) -> tuple[Tensor, Tensor]:
    """Time-major standardised inputs ``(T-1, N, 1)`` and next-value targets ``(T-1, N, 1)``."""
    x = (seqs.values[:, :-1] - mean) / std
    y = (seqs.normal[:, 1:] - mean) / std
    return torch.from_numpy(x).transpose(0, 1).contiguous(), torch.from_numpy(y).transpose(0, 1).contiguous()


def train(cfg: TrainConfig) -> tuple[nn.LSTM, nn.Linear, dict[str, float]]:
    """Fit the LSTM + linear head on standardised data; returns the modules and the data statistics."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    seqs = simulate_sequences(cfg.num_sequences, cfg.length, seed=cfg.seed, anomaly_prob=cfg.anomaly_prob)
    mean, std = standardise(seqs.values)
    x, y = make_tensors(seqs, mean, std)
    lstm, head = nn.LSTM(1, HIDDEN), nn.Linear(HIDDEN, 1)
    loss = fit_forecaster(
        lstm, head, x, y, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, seed=cfg.seed, warmup=WARMUP
    )
    return lstm, head, {"mean": mean, "std": std, "final_loss": round(loss, 6)}


def build_model(
    lstm: nn.LSTM, head: nn.Linear, stats: dict[str, float], cfg: TrainConfig
) -> models.StreamModel:
    """The streamable model: standardised value in, next value in sensor units out, with its metadata."""
    model = models.from_torch(lstm, head=head, head_kind="regression")
    with torch.no_grad():
        model.head.scale.fill_(stats["std"])
        model.head.offset.fill_(stats["mean"])
    model.info.version = 1
    model.info.features = {
        "kind": "sensor",
        "features": 1,
        "input": "one reading per event, standardised: (value - mean) / std",
        "output": "forecast of the stream's next reading, sensor units",
        "normalisation": {"mean": stats["mean"], "std": stats["std"]},
    }
    model.info.trained_on = {
        "script": "scripts/train_demo_model.py",
        "data": "connectors.simulated.simulate_sequences",
        "seed": cfg.seed,
        "num_sequences": cfg.num_sequences,
        "length": cfg.length,
        "anomaly_prob": cfg.anomaly_prob,
        "epochs": cfg.epochs,
        "loss": "mse on standardised spike-free next value",
        "final_loss": stats["final_loss"],
    }
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    cfg = TrainConfig(seed=args.seed)
    started = time.perf_counter()
    lstm, head, stats = train(cfg)
    path = models.save_bundle(build_model(lstm, head, stats, cfg), args.out)
    took = time.perf_counter() - started
    print(f"saved {path} ({path.stat().st_size} bytes) in {took:.1f} s; final mse {stats['final_loss']}")


if __name__ == "__main__":
    main()
