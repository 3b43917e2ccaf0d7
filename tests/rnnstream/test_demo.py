"""The shipped sensor forecaster is really trained, and ``run_demo`` runs end to end by itself."""

from __future__ import annotations

import io
import math
import time

import numpy as np
import pytest
import torch
from rich.console import Console

from connectors.base import Event
from connectors.simulated import simulate_sequences
from engine.engine import Engine
from models.stream_model import StreamModel
from rnnstream.demo import ASSET, DemoSummary, ForecastTracker, load_demo_model, run_demo

WARMUP = 20


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def model() -> StreamModel:
    return load_demo_model()


def forecasts(model: StreamModel, values: np.ndarray) -> np.ndarray:
    """One-step-ahead forecasts ``(B, T)`` of sequences ``values (B, T, 1)``; entry ``t`` predicts ``t+1``."""
    norm = model.info.features["normalisation"]
    x = torch.from_numpy((values - norm["mean"]) / norm["std"]).transpose(0, 1)
    with torch.no_grad():
        out, _ = model(x)
    return out.transpose(0, 1)[..., 0].numpy()


def test_asset_is_small_and_described(model: StreamModel) -> None:
    assert ASSET.stat().st_size < 100_000
    assert model.spec.cell == "lstm" and model.spec.head == "regression"
    assert model.feature_size == 1 and model.output_size == 1
    features = model.info.features
    assert features["kind"] == "sensor" and features["features"] == 1
    assert features["normalisation"]["std"] > 0
    trained = model.info.trained_on
    assert trained["script"] == "scripts/train_demo_model.py"
    assert {"seed", "num_sequences", "final_loss"} <= trained.keys()


def test_forecasts_beat_naive_baselines_on_fresh_data(model: StreamModel) -> None:
    seqs = simulate_sequences(128, 300, seed=12345)  # training used seed 0
    pred = forecasts(model, seqs.values)[:, WARMUP:-1]
    target = seqs.values[:, WARMUP + 1 :, 0]
    last = seqs.values[:, WARMUP:-1, 0]
    normal = ~seqs.spiked[:, WARMUP + 1 :] & ~seqs.spiked[:, WARMUP:-1]
    model_mae = np.abs(pred - target)[normal].mean()
    last_mae = np.abs(last - target)[normal].mean()
    zero_mae = np.abs(target)[normal].mean()
    assert model_mae < 0.5 * last_mae, (model_mae, last_mae)
    assert model_mae < 0.2 * zero_mae, (model_mae, zero_mae)


def test_engine_streams_the_asset_like_forward(model: StreamModel) -> None:
    seqs = simulate_sequences(16, 40, seed=7)
    expected = forecasts(model, seqs.values)
    norm = model.info.features["normalisation"]
    x = (seqs.values - norm["mean"]) / norm["std"]
    with Engine(load_demo_model(), device="cpu") as engine:
        got = np.stack([engine.step_many(list(range(16)), x[:, t]) for t in range(40)], axis=1)[..., 0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_tracker_flags_a_spike_but_not_its_echo() -> None:
    tracker = ForecastTracker(num_streams=1, k=5.0, warmup=30)
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 0.05, 200).astype(np.float32)
    values[150] += 2.0
    for i, v in enumerate(values):
        echo = 2.0 if i == 150 else 0.0  # the forecast made from the spike is off too
        tracker.update(Event(0, np.array([v]), label=i == 150), np.array([echo], np.float32))
    assert tracker.anomalies == 1 and tracker.caught == 1 and tracker.injected == 1
    assert tracker.recent[-1].stream_id == 0 and tracker.recent[-1].sigmas > 5
    assert tracker.scored == 199


def test_run_demo_plain(model: StreamModel) -> None:
    out = io.StringIO()
    console = Console(file=out, width=120)
    summary = run_demo(num_streams=50, seconds=2, live=False, console=console)
    assert isinstance(summary, DemoSummary)
    assert summary.events > 0 and summary.events_per_s > 0
    assert 1.9 < summary.seconds < 10
    assert math.isfinite(summary.latency_p50_ms) and math.isfinite(summary.latency_p99_ms)
    assert 0 < summary.latency_p50_ms <= summary.latency_p99_ms
    assert summary.mean_abs_error < summary.naive_abs_error
    # The simulated sensors inject spikes (labelled events); the detector flags most of them, and few
    # of its flags are anything else. Spikes in a stream's first ``warmup`` scored events cannot be
    # flagged: at ~30,000 events/s that is ~3% of them, so the run catches ~97-100% (seeds 0-5); 80%
    # leaves room for a machine several times slower.
    assert summary.injected_spikes >= 20, summary  # enough spikes for the shares below to mean something
    assert summary.spikes_caught >= 0.8 * summary.injected_spikes, summary
    assert summary.anomalies - summary.spikes_caught <= 0.2 * summary.anomalies, summary
    text = out.getvalue()
    assert "events=" in text and "rnnstream demo summary" in text


def test_run_demo_live_at_a_rate() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    summary = run_demo(num_streams=20, seconds=1, rate=2000, device="cpu", console=console)
    assert 0 < summary.events_per_s < 2600
    assert "latency" in out.getvalue()


def test_run_demo_ends_on_time_at_a_slow_rate() -> None:
    started = time.monotonic()
    summary = run_demo(num_streams=5, seconds=1, rate=0.5, live=False, device="cpu", console=quiet())
    assert time.monotonic() - started < 5
    assert summary.events == 1  # the next one is due 2 s later
    assert math.isnan(summary.mean_abs_error)  # nothing to score a forecast against yet


def test_run_demo_reraises_producer_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_submit(self: Engine, stream_id: object, x: object) -> None:
        raise RuntimeError("submit broke")

    monkeypatch.setattr(Engine, "submit", broken_submit)
    monkeypatch.setattr("rnnstream.demo._warm_up", lambda engine: None)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="submit broke"):
        run_demo(num_streams=5, seconds=30, live=False, device="cpu", console=quiet())
    assert time.monotonic() - started < 10


def test_run_demo_with_finetuning_reports_when_the_worker_first_updated_and_published() -> None:
    """``--finetune``: the summary (and its table) say how many updates and versions the worker made and
    when the first of each came, counted from the start of fine-tuning (NaN: none yet)."""
    out = io.StringIO()
    summary = run_demo(
        num_streams=50,
        seconds=6,
        rate=5000,
        live=False,
        device="cpu",
        finetune=True,
        console=Console(file=out),
    )
    assert summary.events > 0
    updated, published = summary.finetune_updates > 0, summary.finetune_versions > 0
    assert updated == math.isfinite(summary.first_update_s), summary
    assert published == math.isfinite(summary.first_version_s), summary
    if updated:
        assert 0 < summary.first_update_s < summary.seconds + 10
    if published:
        assert summary.first_update_s <= summary.first_version_s
    assert summary.finetune and "first update" in out.getvalue().split("rnnstream demo summary")[1]
