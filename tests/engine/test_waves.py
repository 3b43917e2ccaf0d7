"""The O(N)-a-wave plan (``StateStore.waves``, a scratch array) against the sorting one."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.batcher import NO_EVENT, plan_waves


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=200), st.booleans())
def test_scratch_plan_equals_the_sorting_plan(slots: list[int], by_slot: bool) -> None:
    arr = np.array(slots, dtype=np.int64)
    scratch = np.full(41, NO_EVENT, dtype=np.int64)
    got = plan_waves(arr, by_slot=by_slot, scratch=scratch)
    want = plan_waves(arr, by_slot=by_slot)
    assert [w.tolist() for w in got] == [w.tolist() for w in want]
    assert (scratch == NO_EVENT).all()  # left ready for the next call
