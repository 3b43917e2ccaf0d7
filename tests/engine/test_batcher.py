"""Pure logic of the batcher: wave planning and the bounded pending queue."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.batcher import Pending, PendingQueue, plan_waves
from engine.errors import EngineClosedError


def test_waves_of_distinct_streams_are_one_wave():
    waves = plan_waves(np.array([5, 3, 9, 0]))
    assert len(waves) == 1 and waves[0].tolist() == [0, 1, 2, 3]


def test_repeated_streams_split_into_ordered_waves():
    waves = plan_waves(np.array([1, 2, 1, 1, 3, 2]))
    assert [w.tolist() for w in waves] == [[0, 1, 4], [2, 5], [3]]


def test_empty_batch():
    assert plan_waves(np.array([], dtype=np.int64)) == []


@given(st.lists(st.integers(0, 6), max_size=60), st.booleans())
def test_wave_plan_properties(slots_list, by_slot):
    slots = np.array(slots_list, dtype=np.int64)
    waves = plan_waves(slots, by_slot=by_slot)
    for wave in waves:  # by_slot: ascending slots (a paged store gathers them without reordering)
        in_order = np.sort(slots[wave]) if by_slot else slots[np.sort(wave)]
        assert slots[wave].tolist() == in_order.tolist()
    seen = np.concatenate(waves) if waves else np.array([], dtype=np.int64)
    assert sorted(seen.tolist()) == list(range(len(slots)))  # every event exactly once
    for wave in waves:
        assert len(set(slots[wave].tolist())) == len(wave)  # at most one event per stream
    # per-stream arrival order is the wave order
    position = {int(i): k for k, wave in enumerate(waves) for i in wave}
    for s in set(slots_list):
        events = [i for i, v in enumerate(slots_list) if v == s]
        assert [position[i] for i in events] == sorted(position[i] for i in events)
        assert len({position[i] for i in events}) == len(events)


def _item(i: int) -> Pending:
    return Pending("step", i, None, Future(), time.monotonic())


def test_batch_closes_at_max_batch():
    q = PendingQueue(max_pending=100)
    for i in range(10):
        q.put(_item(i))
    batch = q.take_batch(max_batch=4, max_delay_s=1.0, idle_timeout_s=0.01)
    assert [it.stream_id for it in batch] == [0, 1, 2, 3]
    assert len(q) == 6


def test_batch_closes_after_max_delay():
    q = PendingQueue(max_pending=100)
    q.put(_item(0))
    start = time.monotonic()
    batch = q.take_batch(max_batch=64, max_delay_s=0.02, idle_timeout_s=1.0)
    assert len(batch) == 1 and time.monotonic() - start >= 0.015


def test_idle_take_returns_empty():
    assert PendingQueue(10).take_batch(8, 0.0, idle_timeout_s=0.01) == []


def test_put_blocks_when_full_until_the_loop_takes():
    q = PendingQueue(max_pending=3)
    for i in range(3):
        q.put(_item(i))
    done = threading.Event()

    def blocked_put() -> None:
        q.put(_item(99))
        done.set()

    threading.Thread(target=blocked_put, daemon=True).start()
    assert not done.wait(0.1)  # backpressure: the 4th put waits
    q.take_batch(2, 0.0, 0.01)
    assert done.wait(2)
    assert len(q) == 2


def test_put_wakes_a_waiting_loop():
    q = PendingQueue(10)
    threading.Timer(0.05, lambda: q.put(_item(1))).start()
    start = time.monotonic()
    batch = q.take_batch(8, 0.0, idle_timeout_s=5.0)
    assert len(batch) == 1 and time.monotonic() - start < 2.0


def test_closed_queue_refuses_puts():
    q = PendingQueue(10)
    q.put(_item(0))
    assert len(q.close()) == 1
    with pytest.raises(EngineClosedError):
        q.put(_item(1))
