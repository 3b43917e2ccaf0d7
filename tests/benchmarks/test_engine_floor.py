"""The floor table runs and its figures are ordered as the floors they are."""

from __future__ import annotations

from benchmarks.engine_floor import floor_row, render


def test_floor_row_measures_every_contender() -> None:
    row = floor_row("gru", 16, threads=1, rounds=1)
    assert {"naive_eps", "engine_eps", "kernels_eps", "gemms_eps"} <= set(row)
    # The GEMMs are part of the kernels, which are part of the engine's work: each floor is faster.
    assert row["gemms_eps"] > row["kernels_eps"] > row["engine_eps"] > row["naive_eps"] > 0
    render([row], "test machine")
