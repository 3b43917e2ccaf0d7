"""The floor table runs end to end (its figures are measured by hand: no timing is asserted here)."""

from __future__ import annotations

from benchmarks.engine_floor import floor_row, render


def test_floor_row_measures_every_contender() -> None:
    row = floor_row("gru", 16, threads=1, rounds=1)
    assert {"naive_eps", "engine_eps", "kernels_eps", "gemms_eps"} <= set(row)
    assert min(row[k] for k in ("naive_eps", "engine_eps", "kernels_eps", "gemms_eps")) > 0
    render([row], "test machine")
