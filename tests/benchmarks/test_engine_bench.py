"""Smoke test of the engine benchmark: a quick CPU run yields complete, finite, positive figures."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from benchmarks.engine_bench import render_table, run_engine_benchmarks

THROUGHPUT_FIGURES = (
    "engine_eps",
    "naive_eps",
    "window_eps",
    "engine_over_naive",
    "engine_over_window",
    "flops_per_event",
    "gflops",
    "matmul_gflops_alongside",
    "pct_of_matmul",
)
LATENCY_FIGURES = (
    "closed_loop_eps",
    "offered_eps",
    "events",
    "mean_batch_events",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "max_ms",
)
MEMORY_FIGURES = (
    "streams",
    "capacity",
    "raw_bytes",
    "state_bytes",
    "state_ratio",
    "rss_growth_bytes",
    "rss_ratio",
)


def _finite_positive(row: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)


@pytest.mark.slow
def test_quick_engine_benchmark_structure() -> None:
    messages: list[str] = []
    results = run_engine_benchmarks(device="cpu", quick=True, progress=messages.append)

    assert messages
    json.loads(json.dumps(results))  # JSON-able
    machine = results["machine"]
    assert machine["device"] == "cpu" and machine["torch_threads"] >= 1 and machine["cpu_model"]
    _finite_positive(results["matmul"], ("n", "gflops"))

    rows = results["throughput"]
    assert {(r["cell"], r["hidden"]) for r in rows} == {
        (c, h) for c in ("rnn_tanh", "gru", "lstm") for h in (64, 256)
    }
    for row in rows:
        _finite_positive(row, THROUGHPUT_FIGURES)
        assert all(isinstance(ok, bool) for ok in row["checks"].values())
    _finite_positive(results["submit"], ("submit_eps", "submit_over_naive"))

    latency = results["latency"]
    assert latency[0]["default_setting"] and latency[1]["max_delay_ms"] == 0
    if len(latency) == 3:  # default settings with one torch thread (CPU with several threads only)
        assert latency[2]["default_setting"] and latency[2]["torch_threads"] == 1
    for row in latency:
        _finite_positive(row, LATENCY_FIGURES)
        assert row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"] <= row["max_ms"]

    memory = results["memory"]
    _finite_positive(memory, MEMORY_FIGURES)
    assert memory["streams"] == 100_000 and memory["capacity"] >= memory["streams"]
    assert memory["state_bytes"] >= memory["raw_bytes"]

    tables = render_table(results)
    out = io.StringIO()
    console = Console(width=160, file=out)
    for table in tables:
        console.print(table)
    text = out.getvalue()
    assert "Throughput" in text and "Latency" in text and "memory" in text


@pytest.mark.slow
def test_finetune_bench_measures_both_latencies_and_the_drift(tmp_path):
    """A shortened ``rnnstream bench finetune``: both latency rows, worker progress, a drift result."""
    from benchmarks import finetune_bench as fb

    model = fb.train_sine_forecaster(hidden=16, updates=30)
    off = fb.latency_run(model, False, rate=2000, seconds=1.0, streams=100, seed=0)
    on = fb.latency_run(model, True, rate=2000, seconds=1.0, streams=100, seed=0)
    assert off["events"] == on["events"] == 2000
    assert on["updates_per_s"] > 0 and "updates_per_s" not in off
    drift = fb.drift_run(model, streams=8, max_steps=50, seed=0)
    assert drift["frozen_error_after"] > 0 and drift["checks"]["recovered"] == (
        drift["recovered_steps"] is not None
    )
    row = {
        "rate_eps": 2000,
        "off": off,
        "on": on,
        "p50_ratio": 1.0,
        "p99_ratio": 1.0,
        "checks": {"p99_ratio": True},
    }
    results = {"latency": [row], "drift": drift, "checks": {"p99_ratio": True, "drift_recovered": False}}
    assert len(fb.render_tables(results)) == 2
