"""``benchmarks/rollout_cost.py`` gives the architectures table's rows, both contenders measured."""

from __future__ import annotations

import pytest

from benchmarks import rollout_cost

KEYS = {"architecture", "setting", "engine_us_per_event", "baseline", "baseline_us_per_event", "speedup"}


@pytest.mark.slow
def test_quick_rows_measure_forecast_and_decode_against_the_per_stream_loop():
    rows = rollout_cost.rows(quick=True)
    assert [r["architecture"] for r in rows] == ["forecast rollout", "encoder-decoder decode"]
    for row in rows:
        assert set(row) >= KEYS
        assert row["engine_us_per_event"] > 0 and row["baseline_us_per_event"] > 0
        assert row["speedup"] == pytest.approx(row["baseline_us_per_event"] / row["engine_us_per_event"])
