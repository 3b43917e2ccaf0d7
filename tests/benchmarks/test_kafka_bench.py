"""Kafka benchmark: the tables mark each figure against the targets (figures on both sides of each) and
compute the profile's shares, and missing answers count as infinitely late (the full run needs a broker:
not a unit test)."""

from __future__ import annotations

import math

import numpy as np

from benchmarks.kafka_bench import INTERVALS_MS, TARGETS, _percentiles, render_tables
from tests.benchmarks.tables import table_rows as _rows

P99 = TARGETS["p99_ms"]


def _latency(interval: int, produce_p99: float, committed_p99: float, answered: int) -> dict[str, float]:
    lat: dict[str, float] = {"offered_rate": 20_000.0, "interval_ms": interval, "messages": 240_000}
    lat["answered"] = answered
    for name, p99 in (
        ("input_appended", 4.0),
        ("service", 6.0),
        ("produce", produce_p99),
        ("committed", committed_p99),
    ):
        lat |= {f"{name}_p50_ms": p99 / 4, f"{name}_p99_ms": p99, f"{name}_max_ms": 2 * p99}
    return lat


def _results() -> dict:
    """Figures on both sides of each target: exactly at it (met) and just past it (missed)."""
    return {
        "libraries": {
            # confluent-kafka: throughput exactly at the targets, produced at the p99 target, committed past
            "confluent-kafka": {
                "single": {"msgs_per_s": float(TARGETS["single_msgs_per_s"])},
                "batched": {"events_per_s": float(TARGETS["batched_events_per_s"])},
                "latency": {str(i): _latency(i, P99, P99 + 0.4, 240_000) for i in INTERVALS_MS},
            },
            # kafka-python: just under the throughput targets, produced far past the p99 one, committed within
            "kafka-python": {
                "single": {"msgs_per_s": TARGETS["single_msgs_per_s"] - 1.0},
                "batched": {"events_per_s": TARGETS["batched_events_per_s"] - 1.0},
                "latency": {str(i): _latency(i, 100 * P99, P99 - 10, 239_990) for i in INTERVALS_MS},
            },
        },
        "profile": {"wall_s": 2.0, "messages": 1000, "stages_s": {"engine: step_many": 0.3, "poll": 1.0}},
    }


def test_throughput_marks_follow_the_targets() -> None:
    throughput = {r["client"]: r for r in _rows(render_tables(_results())[0])}
    single, batched = TARGETS["single_msgs_per_s"], TARGETS["batched_events_per_s"]
    assert throughput["confluent-kafka"]["single msg/s"] == f"{single:,} ✓"  # at the target: met
    assert throughput["confluent-kafka"]["batched events/s"] == f"{batched:,} ✓"
    assert throughput["kafka-python"]["single msg/s"] == f"{single - 1:,} ✗"  # one under: missed
    assert throughput["kafka-python"]["batched events/s"] == f"{batched - 1:,} ✗"


def test_latency_marks_follow_the_p99_target_per_column_and_interval() -> None:
    table = render_tables(_results())[1]
    assert "20,000 single-event msg/s" in str(table.title)
    rows = _rows(table)
    assert [(r["client"], r["checkpoint"]) for r in rows] == [
        (lib, f"{i} ms") for lib in ("confluent-kafka", "kafka-python") for i in INTERVALS_MS
    ]
    for r in rows:
        assert r["input appended"] == "1 / 4" and r["service"] == "2 / 6"  # p50 / p99, no mark
        if r["client"] == "confluent-kafka":
            assert r["produced"] == f"{P99 / 4:,.0f} / {P99:,.0f} ✓"  # at the target
            # just past it: printed rounded to the target, but marked as missed
            assert r["committed"] == f"{(P99 + 0.4) / 4:,.0f} / {P99 + 0.4:,.0f} ✗"
            assert r["answered"] == "240,000/240,000"
        else:
            assert r["produced"] == f"{25 * P99:,.0f} / {100 * P99:,.0f} ✗"
            assert r["committed"] == f"{(P99 - 10) / 4:,.0f} / {P99 - 10:,.0f} ✓"
            assert r["answered"] == "239,990/240,000"


def test_profile_shares_are_computed_and_sorted() -> None:
    rows = _rows(render_tables(_results())[2])
    assert [(r["stage"], r["seconds"], r["share of wall"]) for r in rows] == [
        ("poll", "1.00", "50%"),
        ("engine: step_many", "0.30", "15%"),
        ("wall", "2.00", "100%"),
    ]


def test_unanswered_messages_are_infinitely_late() -> None:
    figures = _percentiles("committed", np.concatenate([np.ones(98), np.full(2, np.inf)]))
    assert figures["committed_p50_ms"] == 1.0
    assert math.isinf(figures["committed_p99_ms"]) and math.isinf(figures["committed_max_ms"])
