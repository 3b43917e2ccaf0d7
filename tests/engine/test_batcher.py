"""Pure logic of the batcher: wave planning and the bounded pending queue."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.batcher import EventFuture, EventRun, Pending, PendingQueue, plan_waves
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


# ---- event runs: what submit and submit_many queue --------------------------------------------------------
def _events_queue(max_pending: int = 100, run_rows: int = 4) -> PendingQueue:
    return PendingQueue(max_pending, (2,), np.float32, run_rows=run_rows)


def _put_events(q: PendingQueue, ids: list) -> list[EventFuture]:
    futures = [EventFuture() for _ in ids]
    for sid, f in zip(ids, futures, strict=True):
        q.put_event(sid, np.full(2, float(sid), np.float32), f, time.monotonic())
    return futures


def test_events_share_a_run_until_it_is_full_or_something_else_is_queued():
    q = _events_queue(run_rows=4)
    _put_events(q, [0, 1, 2, 3, 4])  # a run of 4, then a new one
    q.put(_item(99))  # a control closes the open run: the next event queues behind it
    _put_events(q, [5])
    batch = EventRun.batch([6, 7], np.zeros((2, 2), np.float32), Future(), time.monotonic())
    q.put(batch)
    _put_events(q, [8])
    assert len(q) == 10  # events, and the control counts as one
    items = q.pop(100)
    assert [type(it).__name__ for it in items] == [
        "EventRun",
        "EventRun",
        "Pending",
        "EventRun",
        "EventRun",
        "EventRun",
    ]
    assert [list(it.ids) if isinstance(it, EventRun) else it.stream_id for it in items] == [
        [0, 1, 2, 3],
        [4],
        99,
        [5],
        [6, 7],
        [8],
    ]
    first = items[0]
    assert first.values[: first.n, 0].tolist() == [0.0, 1.0, 2.0, 3.0] and len(q) == 0


def test_a_row_is_copied_when_queued():
    q = _events_queue()
    row = np.ones(2, np.float32)
    q.put_event("s", row, EventFuture(), time.monotonic())
    row[:] = 5.0
    (run,) = q.pop(10)
    assert run.values[0].tolist() == [1.0, 1.0]


def test_pop_takes_whole_items_up_to_max_events_and_a_big_batch_alone():
    q = _events_queue(run_rows=3)
    _put_events(q, [0, 1, 2, 3, 4])  # runs of 3 and 2
    q.put(EventRun.batch(list(range(10)), np.zeros((10, 2), np.float32), Future(), time.monotonic()))
    assert [it.n for it in q.pop(4)] == [3]  # 3 + 2 > 4: the second run waits
    assert [it.n for it in q.pop(4)] == [2]
    assert [it.n for it in q.pop(4)] == [10]  # larger than max_events: alone
    assert q.pop(4) == []


def test_events_after_the_loop_took_a_run_start_a_new_one():
    q = _events_queue(run_rows=8)
    _put_events(q, [0, 1])
    (taken,) = q.pop(100)
    _put_events(q, [2])
    assert taken.n == 2 and list(taken.ids) == [0, 1]  # not appended to after it was taken
    (later,) = q.pop(100)
    assert list(later.ids) == [2]


def test_backpressure_counts_events_and_a_batch_waits_until_it_fits():
    q = _events_queue(max_pending=4, run_rows=8)
    _put_events(q, [0, 1, 2])
    done = threading.Event()

    def put_batch() -> None:
        q.put(EventRun.batch([5, 6], np.zeros((2, 2), np.float32), Future(), time.monotonic()))
        done.set()

    threading.Thread(target=put_batch, daemon=True).start()
    assert not done.wait(0.1)  # 3 + 2 > 4
    q.pop(1)
    assert done.wait(2) and len(q) == 2


def test_max_delay_waits_for_events_not_items():
    q = _events_queue(run_rows=64)
    _put_events(q, [0, 1, 2])  # one item holding three events: a batch of 3 is ready at once
    start = time.monotonic()
    assert q.wait_ready(max_batch=3, max_delay_s=5.0, idle_timeout_s=1.0)
    assert time.monotonic() - start < 2.5


def test_close_hands_back_every_queued_event_and_batch():
    q = _events_queue()
    futures = _put_events(q, [0, 1])
    batch_future: Future = Future()
    q.put(EventRun.batch(["a", "b"], np.zeros((2, 2), np.float32), batch_future, time.monotonic()))
    rest = q.close()
    assert [(p.op, p.future) for p in rest] == [
        ("step", futures[0]),
        ("step", futures[1]),
        ("batch", batch_future),
    ]
    assert rest[2].stream_id == ["a", "b"]
    with pytest.raises(EngineClosedError):
        q.put_event(3, np.zeros(2, np.float32), EventFuture(), time.monotonic())
