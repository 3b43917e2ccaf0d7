"""benchmarks/utterance_cost.py: its rows follow the architectures table's contract, and the engine's
answers it times equal the baseline's (the torch module on each utterance alone)."""

from __future__ import annotations

from benchmarks.utterance_cost import measure

KEYS = {"architecture", "setting", "engine_us_per_event", "baseline", "baseline_us_per_event", "speedup"}


def test_rows_compare_the_same_answers_and_follow_the_table_contract():
    rows = measure("lstm", streams=12, rounds=1)  # raises if the engine's answers differ from the baseline's
    assert len(rows) == 2
    for row in rows:
        assert set(row) >= KEYS
        assert row["engine_us_per_event"] > 0 and row["baseline_us_per_event"] > 0
