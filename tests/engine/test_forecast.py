"""Forecasting rollouts (``Engine.forecast`` / ``forecast_many``): equal to the offline torch rollout (the
module over the history, then its own predictions fed back), for interleaved streams, and read-only."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Engine, UnknownStreamError
from models.rollout import MAX_HORIZON, NotForecastableError

ATOL = RTOL = 1e-5


def torch_rollout(ref, history: np.ndarray, horizon: int) -> np.ndarray:
    """The offline reference: ``ref.module`` (+ head) over ``history (T, F)``, then ``horizon - 1`` steps
    of the module on its own last prediction. Returns ``(horizon, out)``."""
    with torch.no_grad():
        out, hidden = ref.module(torch.as_tensor(history).unsqueeze(1))
        y = ref.head(out[-1]) if ref.head is not None else out[-1]
        forecasts = [y]
        for _ in range(horizon - 1):
            out, hidden = ref.module(y.unsqueeze(0), hidden)
            y = ref.head(out[-1]) if ref.head is not None else out[-1]
            forecasts.append(y)
        return torch.cat(forecasts).numpy()


@st.composite
def scenarios(draw):
    kind = draw(st.sampled_from(["rnn_tanh", "rnn_relu", "gru", "lstm"]))
    features = draw(st.integers(1, 5))
    with_head = draw(st.booleans())
    cfg = dict(
        kind=kind,
        num_layers=draw(st.integers(1, 3)),
        input_size=features,
        hidden_size=draw(st.integers(1, 10)) if with_head else features,
        bias=draw(st.booleans()),
        head_out=features if with_head else 0,
        seed=draw(st.integers(0, 2**16)),
    )
    if kind == "lstm" and with_head and cfg["hidden_size"] > 1 and draw(st.booleans()):
        cfg["proj_size"] = draw(st.integers(1, cfg["hidden_size"] - 1))
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=6))
    order = draw(st.permutations([s for s, n in enumerate(lengths) for _ in range(n)]))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=5)))
    modes = draw(st.lists(st.sampled_from(["submit", "step_many"]), min_size=len(cuts) + 1, max_size=6))
    horizon = draw(st.integers(1, 6))
    return cfg, lengths, order, cuts, modes, horizon


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_forecasts_of_interleaved_streams_equal_the_offline_torch_rollout(ref_factory, scenario):
    """After every chunk of interleaved events (submitted or stepped), ``forecast_many`` over the streams
    seen so far equals, per stream, the torch module over its history then fed its own predictions."""
    cfg, lengths, order, cuts, modes, horizon = scenario
    ref = ref_factory(**cfg)
    rng = np.random.default_rng(cfg["seed"])
    seqs = [ref.random_inputs(rng, n) for n in lengths]
    cursor = [0] * len(lengths)
    with Engine(ref.model, device="cpu", max_batch=4, capacity=2, page_rows=2) as engine:
        bounds = [0, *cuts, len(order)]
        for (lo, hi), mode in zip(itertools.pairwise(bounds), modes, strict=False):
            chunk = order[lo:hi]
            if not chunk:
                continue
            xs = np.stack([seqs[s][cursor[s] + chunk[:i].count(s)] for i, s in enumerate(chunk)])
            ids = [f"s{s}" for s in chunk]
            if mode == "step_many":
                engine.step_many(ids, xs)
            else:
                for f in [engine.submit(i, x) for i, x in zip(ids, xs, strict=True)]:
                    f.result(timeout=30)  # forecast_many orders itself after them anyway
            for s in chunk:
                cursor[s] += 1
            seen = [s for s in range(len(lengths)) if cursor[s]]
            got = engine.forecast_many([f"s{s}" for s in reversed(seen)], horizon)
            assert got.shape == (len(seen), horizon, ref.model.output_size)
            for row, s in zip(got, reversed(seen), strict=True):
                expected = torch_rollout(ref, seqs[s][: cursor[s]], horizon)
                np.testing.assert_allclose(row, expected, atol=ATOL, rtol=RTOL, err_msg=f"stream {s}")


@pytest.fixture
def forecaster(ref_factory):
    return ref_factory("lstm", input_size=3, hidden_size=8, num_layers=2, head_out=3, seed=4)


def test_forecast_is_ordered_after_queued_events_and_leaves_the_state_untouched(forecaster):
    """A forecast between two events: the next event's output equals the one of an engine that never
    forecast; the event count and the stream's idle time are unchanged."""
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((6, 3)).astype(np.float32)
    with Engine(forecaster.model, device="cpu") as plain:
        expected = plain.step_many(["a"] * 6, xs)
    with Engine(forecaster.model, device="cpu") as engine:
        futures = [engine.submit("a", x) for x in xs[:5]]  # queued: forecast runs after them
        first = engine.forecast("a", 7)
        events, seen = engine.stats().events, engine._store.last_seen.copy()
        again = engine.forecast_many(["a", "a"], 7)
        assert engine.stats().events == events == 5
        np.testing.assert_array_equal(engine._store.last_seen, seen)
        np.testing.assert_allclose(again, [first, first], atol=ATOL, rtol=RTOL)  # a batch of 2: other kernels
        np.testing.assert_allclose(first, torch_rollout(forecaster, xs[:5], 7), atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose([f.result() for f in futures], expected[:5], atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(engine.step_many(["a"], xs[5:]), expected[5:], atol=ATOL, rtol=RTOL)


def test_a_spilled_stream_is_forecast_and_stays_spilled(forecaster):
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((4, 3)).astype(np.float32)
    with Engine(forecaster.model, device="cpu", ttl_s=1e-9, eviction="spill", sweep_interval_s=1e6) as engine:
        engine.step_many(["a", "b", "a", "b"], xs)
        expected = engine.forecast_many(["a", "b"], 5)
        assert engine.evict_idle() == 2
        assert engine.stats().spilled_streams == 2
        np.testing.assert_allclose(engine.forecast_many(["b", "a"], 5), expected[::-1], atol=ATOL, rtol=RTOL)
        stats = engine.stats()
        assert (stats.spilled_streams, stats.active_streams) == (2, 0)
        np.testing.assert_allclose(expected[0], torch_rollout(forecaster, xs[[0, 2]], 5), atol=ATOL)


def test_unknown_streams_bad_horizons_and_unforecastable_models_are_refused(forecaster, ref_factory):
    with Engine(forecaster.model, device="cpu") as engine:
        engine.step_many(["a"], np.zeros((1, 3), np.float32))
        with pytest.raises(UnknownStreamError, match="'nobody'"):
            engine.forecast_many(["a", "nobody"], 3)
        for horizon in (0, -1, MAX_HORIZON + 1, 2.0, True, None):
            with pytest.raises(ValueError, match="horizon"):
                engine.forecast("a", horizon)
        assert "nobody" not in engine and engine.stats().events == 1
        assert engine.forecast_many([], 3).shape == (0, 3, 3)
    for cfg in (dict(input_size=3, head_out=2), dict(input_size=3, num_embeddings=5, head_out=3)):
        model = ref_factory("gru", **cfg).model
        with Engine(model, device="cpu") as engine, pytest.raises(NotForecastableError):
            engine.forecast("a", 3)
