"""Kafka benchmark: the tables render from a results document like the one ``rnnstream bench kafka``
writes, and missing answers count as infinitely late (the full run needs a broker: not a unit test)."""

from __future__ import annotations

import io
import math

import numpy as np
from rich.console import Console

from benchmarks.kafka_bench import INTERVALS_MS, _percentiles, render_tables


def _latency(interval: int, p99: float) -> dict[str, float]:
    lat: dict[str, float] = {"offered_rate": 20_000.0, "interval_ms": interval, "messages": 240_000}
    lat["answered"] = 240_000
    for name in ("input_appended", "service", "produce", "committed"):
        lat |= {f"{name}_p50_ms": p99 / 4, f"{name}_p99_ms": p99, f"{name}_max_ms": 2 * p99}
    return lat


def test_tables_show_throughput_and_both_visibilities_per_interval() -> None:
    libraries = {
        lib: {
            "single": {"msgs_per_s": rate},
            "batched": {"events_per_s": 100 * rate},
            "latency": {str(i): _latency(i, p99) for i in INTERVALS_MS},
        }
        for lib, rate, p99 in (("kafka-python", 24_000.0, 5_000.0), ("confluent-kafka", 100_000.0, 40.0))
    }
    profile = {"wall_s": 1.0, "messages": 1000, "stages_s": {"engine: step_many": 0.25}}
    out = io.StringIO()
    console = Console(file=out, width=160)
    for table in render_tables({"libraries": libraries, "profile": profile}):
        console.print(table)
    text = out.getvalue()
    assert "100,000 ✓" in text and "24,000 ✗" in text
    assert text.count("10 / 40 ✓") == 2 * len(INTERVALS_MS)  # produced and committed, each interval
    assert "1,250 / 5,000 ✗" in text
    for interval in INTERVALS_MS:
        assert f"{interval} ms" in text


def test_unanswered_messages_are_infinitely_late() -> None:
    figures = _percentiles("committed", np.concatenate([np.ones(98), np.full(2, np.inf)]))
    assert figures["committed_p50_ms"] == 1.0
    assert math.isinf(figures["committed_p99_ms"]) and math.isinf(figures["committed_max_ms"])
