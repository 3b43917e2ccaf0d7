"""Kafka benchmark: the table marks each figure against exactly the targets (figures on both sides of each),
names the machine and the default library, computes the profile's shares, and missing answers count as
infinitely late (the full run needs a broker: not a unit test)."""

from __future__ import annotations

import math

import numpy as np

from benchmarks.kafka_bench import DEFAULT_LIBRARY, INTERVALS_MS, TARGETS, _percentiles, render_tables
from rnnstream.config import KafkaConnection
from tests.benchmarks.tables import table_rows as _rows

SERVICE, PRODUCED = TARGETS["service_p99_ms"], TARGETS["produced_p99_ms"]
SINGLE, BATCHED = TARGETS["single_msgs_per_s"], TARGETS["batched_events_per_s"]


def _latency(interval: int, service_p99: float, produce_p99: float, answered: int) -> dict[str, float]:
    lat: dict[str, float] = {"offered_rate": 20_000.0, "interval_ms": interval, "messages": 240_000}
    lat["answered"] = answered
    for name, p99 in (
        ("input_appended", 4.0),
        ("service", service_p99),
        ("produce", produce_p99),
        ("committed", 1000.0),  # no target: never marked
    ):
        lat |= {f"{name}_p50_ms": p99 / 4, f"{name}_p99_ms": p99, f"{name}_max_ms": 2 * p99}
    return lat


def _results() -> dict:
    """Figures on both sides of each target: exactly at it (met) and just past it (missed)."""
    return {
        "default_library": "kafka-python",
        "machine": {"cpu_model": "Test CPU 9000", "cores": 2, "torch": "2.99.0", "load_average_1m": 0.5},
        "libraries": {
            # kafka-python: throughput and latency exactly at the targets
            "kafka-python": {
                "single": {"msgs_per_s": float(SINGLE), "service_cpu_us_per_msg": 9.5},
                "batched": {"events_per_s": float(BATCHED)},
                "latency": {str(i): _latency(i, SERVICE, PRODUCED, 240_000) for i in INTERVALS_MS},
            },
            # confluent-kafka: just past each target
            "confluent-kafka": {
                "single": {"msgs_per_s": SINGLE - 1.0},
                "batched": {"events_per_s": BATCHED - 1.0},
                "latency": {
                    str(i): _latency(i, SERVICE + 0.4, PRODUCED + 0.4, 239_990) for i in INTERVALS_MS
                },
            },
        },
        "profile": {
            "library": "kafka-python",
            "wall_s": 2.0,
            "cpu_s": 3.0,
            "messages": 1000,
            "stages_s": {"engine: step_many": 0.3, "poll": 1.0},
        },
    }


def test_the_benchmark_names_the_configured_default_library() -> None:
    assert KafkaConnection.model_fields["client_library"].default == DEFAULT_LIBRARY


def test_marks_follow_exactly_the_targets() -> None:
    assert (SINGLE, BATCHED, SERVICE, PRODUCED, TARGETS["offered_rate"]) == (
        50_000,
        500_000,
        20.0,
        50.0,
        20_000,
    )
    table = render_tables(_results())[0]
    assert "20,000 single-event msg/s" in str(table.title)
    rows = _rows(table)
    assert [(r["client"], r["checkpoint every"]) for r in rows] == [
        ("kafka-python (default)", "200 ms"),
        ("", "20 ms"),
        ("confluent-kafka", "200 ms"),
        ("", "20 ms"),
    ]
    met, _, missed, _ = rows
    assert met["single-event msg/s"] == f"{SINGLE:,} ✓"  # at the target: met
    assert met["batched events/s (100 per msg)"] == f"{BATCHED:,} ✓"
    assert missed["single-event msg/s"] == f"{SINGLE - 1:,} ✗"  # one under: missed
    assert missed["batched events/s (100 per msg)"] == f"{BATCHED - 1:,} ✗"
    for r in rows:
        assert r["input appended p50 / p99"] == "1 / 4"  # p50 / p99, no mark
        assert r["committed p50 / p99"] == "250 / 1,000"  # no target: no mark
        if r in rows[:2]:
            assert r["service p50 / p99"] == f"{SERVICE / 4:,.0f} / {SERVICE:,.0f} ✓"
            assert r["produced p50 / p99"] == f"{PRODUCED / 4:,.0f} / {PRODUCED:,.0f} ✓"
        else:  # just past: printed rounded to the target, but marked as missed
            assert r["service p50 / p99"] == f"{(SERVICE + 0.4) / 4:,.0f} / {SERVICE + 0.4:,.0f} ✗"
            assert r["produced p50 / p99"] == f"{(PRODUCED + 0.4) / 4:,.0f} / {PRODUCED + 0.4:,.0f} ✗"


def test_the_table_names_the_machine_and_unanswered_inputs() -> None:
    caption = str(render_tables(_results())[0].caption)
    assert "Test CPU 9000, 2 cores, torch 2.99.0" in caption
    assert "kafka-python 9.5 µs" in caption
    assert "confluent-kafka 200 ms: 239,990/240,000 answered" in caption
    assert "confluent-kafka 20 ms: 239,990/240,000 answered" in caption
    assert "kafka-python 200 ms" not in caption.split("answered")[0].split("late:")[-1]


def test_profile_shares_are_computed_and_sorted() -> None:
    table = render_tables(_results())[1]
    assert "kafka-python" in str(table.title)
    rows = _rows(table)
    assert [(r["stage"], r["seconds"], r["share of wall"]) for r in rows] == [
        ("poll", "1.00", "50%"),
        ("engine: step_many", "0.30", "15%"),
        ("wall", "2.00", "100%"),
    ]
    assert "2000.0 µs per message of wall time, 3000.0 µs of CPU" in str(table.caption)


def test_unanswered_messages_are_infinitely_late() -> None:
    figures = _percentiles("committed", np.concatenate([np.ones(98), np.full(2, np.inf)]))
    assert figures["committed_p50_ms"] == 1.0
    assert math.isinf(figures["committed_p99_ms"]) and math.isinf(figures["committed_max_ms"])
