"""``models.cells`` helpers of pure logic (the cells' math is checked against torch in tests/engine)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from models.cells import LSTM_FUSED_MIN_ROWS, fused_pieces


@given(st.integers(0, 300_000))
def test_fused_pieces_tile_the_batch_with_few_sizes(rows: int) -> None:
    pieces = fused_pieces(rows)
    assert pieces[0][0] == 0 and pieces[-1][1] == rows
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(pieces))  # contiguous
    sizes = [b - a for a, b in pieces]
    assert all(s >= LSTM_FUSED_MIN_ROWS for s in sizes[:-1]) and len(pieces) <= 4
    for s in sizes:
        if s >= LSTM_FUSED_MIN_ROWS:  # on the ladder m·2^k, m in 16..31: 16 sizes an octave
            k = s.bit_length() - 5
            assert s == (s >> k) << k and 16 <= s >> k <= 31
    if rows >= LSTM_FUSED_MIN_ROWS:
        assert 16 * sizes[0] >= 15 * rows  # the first piece holds all but at most 1/16


def test_the_ladder_is_small() -> None:
    """Every batch up to 100k rows compiles one of ~160 fused kernels, not one per size."""
    sizes = {b - a for n in range(100_001) for a, b in fused_pieces(n) if b - a >= LSTM_FUSED_MIN_ROWS}
    assert len(sizes) <= 170
