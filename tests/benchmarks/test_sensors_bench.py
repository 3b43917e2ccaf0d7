"""Sensor benchmark: percentiles count missing answers as infinitely late; the tables mark the targets;
the throughput part runs end to end on a small file (the full run is ``rnnstream bench sensors``)."""

from __future__ import annotations

import io
import math

from rich.console import Console

from benchmarks.sensors_bench import (
    naive_rate,
    percentiles,
    pipeline_config,
    pipeline_rate,
    render_tables,
    write_readings,
)


def test_unanswered_readings_are_infinitely_late():
    lat = [0.001] * 98
    figures = percentiles(lat, expected=100)
    assert figures["p50_ms"] == 1.0 and figures["answered"] == 98
    assert math.isinf(figures["p99_ms"]) and math.isinf(figures["max_ms"])
    assert percentiles([0.001] * 100, expected=100)["p99_ms"] == 1.0


def _row(rate: float) -> dict[str, float]:
    return {"readings": 100_000, "seconds": 100_000 / rate, "readings_per_s": rate}


def _lat(p99: float, rate: float = 10_000.0) -> dict[str, float]:
    return {
        "offered_per_s": rate,
        "answered": 1000,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "p999_ms": p99,
        "max_ms": p99,
    }


def test_tables_mark_the_targets():
    results = {
        "throughput": {
            "streams": 10_000,
            "pipeline": _row(60_000.0),
            "pipeline_finetune": _row(40_000.0),
            "naive": _row(10_000.0),
        },
        "latency": {
            "streams": 1000,
            "relay": [_lat(3.0)],
            "rnnstream": [_lat(4.0, rate=2_000.0), _lat(12.5)],
        },
    }
    out = io.StringIO()
    console = Console(file=out, width=160)
    for table in render_tables(results):
        console.print(table)
    text = out.getvalue()
    assert "60,000 ✓" in text and "40,000 ✗" in text and "6.0×" in text
    assert "12.50 ✗" in text and "3.00 " in text and "4.00 " in text and "4.00 ✗" not in text


def test_throughput_runs_the_real_pipeline_and_baseline_on_a_small_file(tmp_path):
    data = tmp_path / "r.csv"
    rows = write_readings(data, streams=50, per_stream=20)
    result = pipeline_rate(pipeline_config(tmp_path, data, finetune=False), rows)
    assert result["readings"] == rows and result["readings_per_s"] > 0
    assert naive_rate(data, limit=200)["readings"] == 200
