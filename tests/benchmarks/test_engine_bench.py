"""Smoke test of the engine benchmark: a quick CPU run yields complete, finite, positive figures."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from benchmarks.engine_bench import render_table, run_engine_benchmarks
from tests.benchmarks.tables import table_rows as _rows

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


@pytest.mark.parametrize("recovered_steps", [412, None], ids=["drift-recovered", "never-recovered"])
def test_finetune_bench_judges_its_measurements_against_the_targets(monkeypatch, recovered_steps):
    """``run_finetune_benchmarks`` with stand-in measurements (p99 with the worker exactly at 1.25x the
    p99 without it at one rate, just past it at the other): the ratios, checks and table marks it
    computes follow the targets, on both sides of each."""
    from benchmarks import finetune_bench as fb

    on_over_off = {2000.0: fb.TARGETS["p99_ratio_max"], 5000.0: fb.TARGETS["p99_ratio_max"] + 0.01}

    def latency_run(model, finetune, rate, seconds, streams, seed, burner=False):
        p99 = 2.0 * (on_over_off[rate] if finetune else 1.5 if burner else 1.0)
        row = {"finetune": finetune, "background_burner": burner, "rate_eps": rate, "events": 100}
        row |= {"p50_ms": p99 / 2, "p99_ms": p99, "max_ms": 2 * p99}
        if finetune:
            row |= {"updates_per_s": 12.5, "chunks_per_update": 32, "published": 3, "rounds": 7}
        return row

    def drift_run(model, streams, max_steps, seed):
        recovered = recovered_steps is not None
        return {
            "streams": streams,
            "error_before_drift": 1.2e-5,
            "frozen_error_after": 1.08,
            "finetuned_error_at_recovery": 0.45 if recovered else 0.9,
            "recovered_steps": recovered_steps,
            "recovered_s": 3.21 if recovered else None,
            "versions_published": 4,
            "worker_updates": 120,
            "checks": {"recovered": recovered},
        }

    monkeypatch.setattr(fb, "train_sine_forecaster", lambda hidden: None)
    monkeypatch.setattr(fb, "latency_run", latency_run)
    monkeypatch.setattr(fb, "drift_run", drift_run)
    results = fb.run_finetune_benchmarks(quick=True, rates=(2000.0, 5000.0), progress=lambda m: None)

    at, past = results["latency"]
    assert at["p99_ratio"] == fb.TARGETS["p99_ratio_max"] and at["checks"]["p99_ratio"] is True
    assert past["p99_ratio"] > fb.TARGETS["p99_ratio_max"] and past["checks"]["p99_ratio"] is False
    assert at["burner_p99_ratio"] == 1.5 and at["p50_ratio"] == at["p99_ratio"]
    assert results["checks"] == {"p99_ratio": False, "drift_recovered": recovered_steps is not None}

    latency, drift = fb.render_tables(results)
    rows = _rows(latency)
    assert [(r["offered ev/s"], r["p99 on/off"]) for r in rows] == [
        ("2,000", "1.25× ✓"),
        ("5,000", "1.26× ✗"),
    ]
    assert rows[0] | {"p99 on/off": ""} == {
        "offered ev/s": "2,000",
        "p50 off": "1.00 ms",
        "p50 on": "1.25 ms",
        "p99 off": "2.00 ms",
        "p99 on": "2.50 ms",
        "p99 on/off": "",
        "updates/s": "12.5",
        "versions": "3",
        "p99 plain loop / off": "1.50×",
    }
    (row,) = _rows(drift)
    assert "64 streams" in str(drift.title)
    if recovered_steps is None:
        assert (row["steps to ≤ 0.5× frozen"], row["seconds"]) == ("never ✗", "—")
    else:
        assert (row["steps to ≤ 0.5× frozen"], row["seconds"]) == ("412 ✓", "3.21")
    assert (row["error before drift"], row["frozen error after"], row["versions"]) == (
        "0.00001",
        "1.0800",
        "4",
    )


@pytest.mark.slow
def test_finetune_bench_quick_run_measures_both_latencies_and_the_drift(monkeypatch):
    """A shortened ``rnnstream bench finetune`` (the real measurements, smaller): both latency rows, the
    plain background loop, worker progress and a drift result, and the table shows what was measured.
    Structure only: speed is the benchmark's to measure."""
    from benchmarks import finetune_bench as fb

    train, latency_run, drift_run = fb.train_sine_forecaster, fb.latency_run, fb.drift_run
    monkeypatch.setattr(fb, "train_sine_forecaster", lambda hidden: train(hidden=16, updates=30))
    monkeypatch.setattr(
        fb,
        "latency_run",
        lambda model, finetune, rate, seconds, streams, seed, burner=False: latency_run(
            model, finetune, rate, seconds=2.0, streams=100, seed=seed, burner=burner
        ),
    )
    monkeypatch.setattr(
        fb, "drift_run", lambda model, streams, max_steps, seed: drift_run(model, 8, 50, seed)
    )
    messages: list[str] = []
    results = fb.run_finetune_benchmarks(quick=True, rates=(2000.0,), progress=messages.append)

    assert messages
    json.loads(json.dumps(results))  # JSON-able
    (r,) = results["latency"]
    off, on, burner = r["off"], r["on"], r["burner"]
    assert off["events"] == on["events"] == burner["events"] == 4000  # 2 s at 2,000 events/s
    assert not off["finetune"] and on["finetune"] and burner["background_burner"]
    assert on["updates_per_s"] > 0 and "updates_per_s" not in off
    assert r["p99_ratio"] == on["p99_ms"] / off["p99_ms"]
    assert r["checks"]["p99_ratio"] == (r["p99_ratio"] <= fb.TARGETS["p99_ratio_max"])
    drift = results["drift"]
    assert drift["streams"] == 8 and drift["frozen_error_after"] > 0
    assert drift["checks"]["recovered"] == (drift["recovered_steps"] is not None)

    latency, drift_table = fb.render_tables(results)
    (row,) = _rows(latency)
    assert row["p99 off"] == f"{off['p99_ms']:.2f} ms" and row["p99 on"] == f"{on['p99_ms']:.2f} ms"
    assert row["p99 on/off"] == f"{r['p99_ratio']:.2f}× " + ("✓" if r["checks"]["p99_ratio"] else "✗")
    assert row["updates/s"] == f"{on['updates_per_s']:.1f}" and row["versions"] == str(on["published"])
    (row,) = _rows(drift_table)
    assert row["frozen error after"] == f"{drift['frozen_error_after']:.4f}"
