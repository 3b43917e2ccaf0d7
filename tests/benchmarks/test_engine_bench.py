"""Smoke test of the engine benchmark: a quick CPU run yields complete, finite, positive figures."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
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
COUNTERS = (
    "loop_cpu_share",
    "submitter_cpu_share",
    "loop_cpu_ms_per_batch",
    "loop_waits_per_batch",
    "loop_preempted_per_batch",
)  # may be NaN off Linux
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
    assert [(r["cell"], r["hidden"], r["input"]) for r in rows] == [
        (c, h, i) for c in ("rnn_tanh", "gru", "lstm") for h, i in ((64, 16), (64, 32), (256, 32))
    ]
    for row in rows:
        _finite_positive(row, THROUGHPUT_FIGURES)
        assert all(isinstance(ok, bool) for ok in row["checks"].values())
    submit = results["submit"]
    _finite_positive(submit, ("submit_eps", "submit_many_eps", "step_many_eps"))
    assert submit["submit_eps"] == latency_default_eps(results)
    assert set(submit["checks"]) == {"submit", "submit_many"}

    latency = results["latency"]
    assert latency[0]["default_setting"] and latency[1]["max_delay_ms"] == 0
    *latency, reference = latency
    assert reference["default_setting"] and reference["reference_rate"] and reference["checks"] == {}
    assert reference["offered_eps"] == 30_000
    if len(latency) == 3:  # default settings with one torch thread (CPU with several threads only)
        assert latency[2]["default_setting"] and latency[2]["torch_threads"] == 1
    latency.append(reference)
    for row in latency:
        _finite_positive(row, LATENCY_FIGURES)
        assert row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"] <= row["max_ms"]
        assert all(math.isnan(row[k]) or row[k] >= 0 for k in COUNTERS)

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
    assert "Throughput" in text and "Queued entry points" in text and "Latency" in text and "memory" in text
    assert text.count(f"torch {torch.__version__}") == len(tables) == 4  # every table names the machine


def latency_default_eps(results: dict) -> float:
    return results["latency"][0]["closed_loop_eps"]


def _results_at(naive_ratio: float, window_ratio: float, pct: float, submit: float, many: float) -> dict:
    """A results dict with every figure set so that each ratio is the given one (stand-in measurements)."""
    from benchmarks import engine_bench as eb

    rows = []
    for cell, hidden, width in eb.throughput_configs():
        engine = 1e6
        rows.append(
            {
                "cell": cell,
                "hidden": hidden,
                "input": width,
                "engine_eps": engine,
                "naive_eps": engine / naive_ratio,
                "window_eps": engine / window_ratio,
                "engine_over_naive": naive_ratio,
                "engine_over_window": window_ratio,
                "gflops": pct,  # against a 100 GFLOP/s matmul
                "background_cpu_cores": 0.0,
            }
        )
    eb.finish_throughput(rows, 100.0)
    machine = {
        "cpu_model": "Test CPU",
        "logical_cores": 2,
        "torch": "9.9",
        "torch_threads": 1,
        "device": "cpu",
    }
    latency = {
        "max_delay_ms": 0.0,
        "default_setting": True,
        "torch_threads": 1,
        "closed_loop_eps": submit,
        "offered_eps": submit / 2,
        "events": 10,
        "mean_batch_events": 3.0,
        "p50_ms": 0.5,
        "p99_ms": 2.0,
        "p999_ms": 3.0,
        "max_ms": 4.0,
        "loop_cpu_share": 0.5,
        "submitter_cpu_share": 0.25,
        "loop_cpu_ms_per_batch": 0.1,
        "loop_waits_per_batch": 0.5,
        "loop_preempted_per_batch": 2.0,
        "background_cpu_cores": 0.0,
        "checks": {"p99": True},
    }
    submit_row = {
        "cell": "lstm",
        "hidden": 64,
        "input": 32,
        "submit_eps": submit,
        "submit_many_eps": many,
        "submit_many_chunk": 4096,
        "step_many_eps": many,
        "checks": {
            "submit": submit >= eb.TARGETS["submit_min_eps"],
            "submit_many": many >= eb.TARGETS["submit_many_min_eps"],
        },
    }
    memory = {
        "streams": 10,
        "capacity": 16,
        "raw_bytes": 1,
        "state_bytes": 1,
        "state_ratio": 1.0,
        "rss_growth_bytes": 1,
        "rss_ratio": 1.0,
        "checks": {"rss_ratio": True},
    }
    return {
        "machine": machine,
        "settings": {"rounds": 1},
        "targets": eb.TARGETS,
        "matmul": {"n": 2048, "gflops": 100.0},
        "throughput": rows,
        "submit": submit_row,
        "latency": [latency],
        "memory": memory,
    }


@pytest.mark.parametrize("side", ["at", "below"])
def test_engine_bench_marks_follow_this_rounds_targets(side):
    """Figures exactly at each target are marked ✓, just below it ✗: engine/naive ≥ 50× at hidden 64 (both
    input sizes), engine/window ≥ 200× (LSTM-64 only), ≥ 60% of matmul at hidden 256, submit() ≥ 150k
    and submit_many() ≥ 1M events/s."""
    from benchmarks import engine_bench as eb

    below = side == "below"
    step = 0.99 if below else 1.0
    tg = eb.TARGETS
    results = _results_at(
        tg["engine_over_naive_min_h64"] * step,
        tg["engine_over_window_min_lstm64"] * step,
        tg["pct_of_matmul_min_h256"] * step,
        tg["submit_min_eps"] * step,
        tg["submit_many_min_eps"] * step,
    )
    throughput, queued, latency, memory = eb.render_table(results)
    mark = "✗" if below else "✓"
    rows = _rows(throughput)
    assert [(r["cell"], r["hidden"], r["input"]) for r in rows] == [
        (c, str(h), str(i)) for c, h, i in eb.throughput_configs()
    ]
    for r in rows:
        if r["hidden"] == "64":
            assert r["engine/naive"].endswith(mark)
            assert r["engine/window"].endswith(mark) == (r["cell"] == "lstm")
            assert not r["% of matmul"].endswith(("✓", "✗"))
        else:
            assert r["% of matmul"].endswith(mark) and not r["engine/naive"].endswith(("✓", "✗"))
    submit, many, step_many = _rows(queued)
    assert submit["events/s"].endswith(mark) and many["events/s"].endswith(mark)
    assert submit["target"] == "≥ 150,000" and many["target"] == "≥ 1,000,000"
    assert not step_many["events/s"].endswith(("✓", "✗"))
    (lat,) = _rows(latency)
    assert (lat["loop CPU"], lat["subm CPU"], lat["ms/batch"]) == ("50%", "25%", "0.100")
    assert (lat["waits/b"], lat["preempt/b"]) == ("0.50", "2.00")
    for table in (throughput, queued, latency, memory):
        assert "Test CPU, 2 cores, torch 9.9" in str(table.caption)


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
