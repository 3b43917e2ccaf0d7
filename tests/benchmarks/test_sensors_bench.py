"""Sensor benchmark: percentiles count missing answers as infinitely late; the tables mark the targets;
the throughput part runs end to end on a small file (the full run is ``rnnstream bench sensors``)."""

from __future__ import annotations

import math

from benchmarks.sensors_bench import (
    naive_rate,
    percentiles,
    pipeline_config,
    pipeline_rate,
    render_tables,
    write_readings,
)
from tests.benchmarks.tables import table_rows as _rows


def test_unanswered_readings_are_infinitely_late():
    lat = [0.001] * 98
    figures = percentiles(lat, expected=100)
    assert figures["p50_ms"] == 1.0 and figures["answered"] == 98
    assert math.isinf(figures["p99_ms"]) and math.isinf(figures["max_ms"])
    assert percentiles([0.001] * 100, expected=100)["p99_ms"] == 1.0


THROUGHPUT_TARGET = 50_000  # readings/s, the pipeline with and without fine-tuning
P99_TARGET_MS, P99_TARGET_RATE = 10.0, 10_000  # rnnstream's p99, judged from this offered rate up


def _row(rate: float) -> dict[str, float]:
    return {"readings": 100_000, "seconds": 100_000 / rate, "readings_per_s": rate}


def _lat(p99: float, rate: float) -> dict[str, float]:
    return {
        "offered_per_s": rate,
        "answered": 9_990,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "p999_ms": 2 * p99,
        "max_ms": 4 * p99,
    }


def test_throughput_marks_follow_the_target_and_ratios_are_computed():
    results = {
        "throughput": {
            "streams": 10_000,
            "pipeline": _row(THROUGHPUT_TARGET),  # at the target: met
            "pipeline_finetune": _row(THROUGHPUT_TARGET - 1),  # one under: missed
            "naive": _row(12_500.0),  # never judged
        }
    }
    (table,) = render_tables(results)
    assert "10,000 streams" in str(table.title)
    assert [tuple(r.values()) for r in _rows(table)] == [
        ("rnnstream", "100,000", "2.00", "50,000 ✓", "4.0×"),
        ("rnnstream + fine-tuning", "100,000", "2.00", "49,999 ✗", "4.0×"),
        ("naive loop", "100,000", "8.00", "12,500", "1.0×"),
    ]


def test_latency_marks_only_rnnstream_at_the_judged_rates():
    results = {
        "latency": {
            "streams": 1000,
            "relay": [_lat(3 * P99_TARGET_MS, P99_TARGET_RATE)],  # the floor: never judged
            "rnnstream": [
                _lat(3 * P99_TARGET_MS, P99_TARGET_RATE - 1),  # below the judged rates: no mark
                _lat(P99_TARGET_MS, P99_TARGET_RATE),  # at the target: met
                _lat(P99_TARGET_MS + 0.01, 2 * P99_TARGET_RATE),  # just past it: missed
            ],
        }
    }
    (table,) = render_tables(results)
    rows = _rows(table)
    assert [(r["path"], r["offered/s"], r["p99 ms"]) for r in rows] == [
        ("plain paho relay (floor)", "10,000", "30.00"),
        ("rnnstream run sensors-mqtt.yaml", "9,999", "30.00"),
        ("rnnstream run sensors-mqtt.yaml", "10,000", "10.00 ✓"),
        ("rnnstream run sensors-mqtt.yaml", "20,000", "10.01 ✗"),
    ]
    assert rows[2] | {"p99 ms": ""} == {
        "path": "rnnstream run sensors-mqtt.yaml",
        "offered/s": "10,000",
        "answered": "9,990",
        "p50 ms": "5.00",
        "p99 ms": "",
        "p99.9 ms": "20.00",
        "max ms": "40.00",
    }


def test_throughput_runs_the_real_pipeline_and_baseline_on_a_small_file(tmp_path):
    data = tmp_path / "r.csv"
    rows = write_readings(data, streams=50, per_stream=20)
    result = pipeline_rate(pipeline_config(tmp_path, data, finetune=False), rows)
    assert result["readings"] == rows and result["readings_per_s"] > 0
    assert naive_rate(data, limit=200)["readings"] == 200
