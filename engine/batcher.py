"""The batcher: a bounded queue of pending events, and the plan that turns a batch into steps.

A batch may hold several events of one stream. ``plan_waves`` splits it into *waves*: wave ``k`` holds
the ``k``-th event of every stream in the batch, so a wave has at most one event per stream and running
the waves in order applies each stream's events strictly in arrival order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import FINISHED, PENDING
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import EngineClosedError, PartiallyAppliedError, StreamCapacityError

NO_EVENT = np.iinfo(np.int64).max  # a ``plan_waves`` scratch cell not in use


def plan_waves(
    slots: np.ndarray, by_slot: bool = False, scratch: np.ndarray | None = None
) -> list[np.ndarray]:
    """Split events into waves of distinct slots, preserving per-slot order.

    slots: ``(N,) int64``, the slot of each event in arrival order. Returns index arrays into the
    events; wave ``k`` holds every slot's ``k``-th event, in arrival order (``by_slot``: in ascending slot
    order, which a paged state store gathers without reordering). O(N log N); O(N) per wave with
    ``scratch``, an int64 array longer than the largest slot, filled with ``NO_EVENT`` (and left so).
    """
    n = len(slots)
    if n == 0:
        return []
    if scratch is not None:
        return _waves_by_first_event(slots, by_slot, scratch)
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    is_first = np.empty(n, dtype=bool)
    is_first[0] = True
    np.not_equal(sorted_slots[1:], sorted_slots[:-1], out=is_first[1:])
    positions = np.arange(n)
    group_start = np.maximum.accumulate(np.where(is_first, positions, 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = positions - group_start
    if not rank.any():
        return [order] if by_slot else [positions]
    by_rank = order[np.argsort(rank[order], kind="stable")] if by_slot else np.argsort(rank, kind="stable")
    counts = np.bincount(rank)
    return np.split(by_rank, np.cumsum(counts)[:-1])


class EventFuture(Future):
    """The future of one queued event: a ``concurrent.futures.Future`` that creates its lock and condition
    only when someone waits on it.

    ``Future()`` builds a ``threading.Condition`` (~0.8 µs) and ``set_result`` takes it and notifies
    (~0.9 µs): with one future per event, that was a third of ``submit``'s cost and of the step loop's
    per-event work. Here the step loop's ``set_result`` on a future nobody waits on stores the result and
    flips the state (~0.2 µs both), and ``add_done_callback`` on a pending one appends under one
    module-wide lock. Everything else is the base class, through the lazily created ``_condition``
    (``result``/``exception``/``concurrent.futures.wait``/``as_completed``/``asyncio.wrap_future``).

    A queued event cannot be taken back: ``cancel()`` returns False (as for a running future), so the
    state only goes ``PENDING`` → ``FINISHED``, once, by the step loop (or by ``close``).

    Why this is race-free: a waiter creates the condition *before* it reads the state, under it;
    ``_finish`` writes the state *before* it looks for the condition, and if one exists, takes it, hands
    the result to ``wait``'s waiters and notifies: a waiter either sees ``FINISHED`` or is notified. A
    callback is appended under ``_CALLBACK_LOCK`` only while the state is ``PENDING``, and ``_finish``
    takes that lock after writing the state, before it runs the callbacks: each runs once, there or in
    ``add_done_callback``.
    """

    def __init__(self) -> None:  # the base class's attributes, but no condition yet
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future], object]] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _CONDITION_LOCK:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    def cancel(self) -> bool:
        """Always False: the engine applies every queued event."""
        return False

    def done(self) -> bool:
        return self._state == FINISHED

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED and self._exception is None:
            return self._result  # written before the state
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        with _CALLBACK_LOCK:
            if self._state == PENDING:
                self._done_callbacks.append(fn)
                return
        try:  # done already: run it now, as the base class does
            fn(self)
        except Exception:
            logging.getLogger("concurrent.futures").exception("exception calling callback for %r", self)

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception)

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        if self._state != PENDING:
            raise InvalidStateError(f"{self!r}: the event's result was set already")
        self._result, self._exception = result, exception
        self._state = FINISHED
        cond = self._cond  # created by a waiter meanwhile?
        if cond is not None:
            with cond:
                for waiter in self._waiters:
                    if exception is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
                cond.notify_all()
        with _CALLBACK_LOCK:  # an add_done_callback in progress has appended by now
            callbacks, self._done_callbacks = self._done_callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                logging.getLogger("concurrent.futures").exception("exception calling callback for %r", self)


_CONDITION_LOCK = threading.Lock()
_CALLBACK_LOCK = threading.Lock()


def _waves_by_first_event(slots: np.ndarray, by_slot: bool, first: np.ndarray) -> list[np.ndarray]:
    """``plan_waves`` without sorting: a wave is the first remaining event of each slot, found by writing
    each event's index at its slot with ``np.minimum.at`` (``first[slot]`` = the slot's first event)."""
    waves = []
    left = np.arange(len(slots))
    while len(left):
        at = slots[left]
        np.minimum.at(first, at, left)
        is_first = first[at] == left
        first[at] = NO_EVENT
        wave = left[is_first]
        waves.append(wave[np.argsort(slots[wave], kind="stable")] if by_slot else wave)
        left = left[~is_first]
    return waves


@dataclass(slots=True)
class Pending:
    """One queued control (``op``: ``start``/``reset``/``end``), or, as ``PendingQueue.close`` returns what
    was left, one data event (``op == "step"``) or one ``submit_many`` batch (``op == "batch"``: ``stream_id``
    the ids, ``x`` the ``(N, ...)`` inputs)."""

    op: str
    stream_id: Any
    x: Any
    future: Future
    submitted: float

    @property
    def n(self) -> int:
        """Queue slots it takes (a control counts as one event for backpressure)."""
        return 1


class EventRun:
    """Data events queued next to each other, stepped together by the step loop.

    Two kinds:

    - *events*: ``submit`` appends one event at a time (``values[:n]``: rows in a preallocated buffer,
      copied at submit; ``futures[i]``/``times[i]``: event ``i``'s future and ``time.monotonic()`` submit
      time). It stays open for appends until the step loop takes it or another item is queued behind it.
    - *batch*: one ``submit_many`` call: ``ids`` a list or an ``(n,) int64`` array, ``values`` ``(n, ...)``,
      one ``future`` for the ``(n, output_size)`` outputs, ``submitted`` its time.
    """

    __slots__ = ("future", "futures", "ids", "n", "submitted", "times", "values")

    def __init__(
        self,
        ids: list[Any],
        values: np.ndarray,
        n: int,
        futures: list[Future] | None,
        times: list[float] | None,
        future: Future | None,
        submitted: float,
    ) -> None:
        self.ids, self.values, self.n = ids, values, n
        self.futures, self.times = futures, times
        self.future, self.submitted = future, submitted

    @classmethod
    def events(cls, rows: int, row_shape: tuple[int, ...], dtype: np.dtype, submitted: float) -> EventRun:
        """An empty *events* run with room for ``rows`` events of ``row_shape``."""
        return cls([], np.empty((rows, *row_shape), dtype=dtype), 0, [], [], None, submitted)

    @classmethod
    def batch(cls, ids: list[Any], values: np.ndarray, future: Future, submitted: float) -> EventRun:
        """A *batch* run: ``ids`` (N) with ``values`` ``(N, ...)``, resolved as a whole through ``future``."""
        return cls(ids, values, len(ids), None, None, future, submitted)

    @property
    def is_batch(self) -> bool:
        return self.futures is None

    def submit_times(self) -> np.ndarray:
        """Each event's submit time, ``(n,) float64`` (``time.monotonic()`` seconds)."""
        if self.times is None:
            return np.full(self.n, self.submitted)
        return np.array(self.times, dtype=np.float64)

    def resolve(self, out: np.ndarray) -> None:
        """Give the events their outputs ``out (n, output_size)``."""
        if self.futures is None:
            self.future.set_result(out)  # type: ignore[union-attr]
            return
        for future, row in zip(self.futures, out, strict=True):
            future.set_result(row)

    def fail(self, exc: BaseException) -> None:
        """Fail every event of the run that is not resolved yet."""
        for future in self.all_futures():
            if not future.done():
                future.set_exception(exc)

    def all_futures(self) -> list[Future]:
        return [self.future] if self.futures is None else self.futures  # type: ignore[list-item]

    def select(self, keep: np.ndarray) -> EventRun:
        """The *events* run of the events where ``keep (n,) bool`` is true (same futures)."""
        idx = np.flatnonzero(keep)
        assert self.futures is not None and self.times is not None
        return EventRun(
            [self.ids[i] for i in idx],
            self.values[: self.n][idx],
            len(idx),
            [self.futures[i] for i in idx],
            [self.times[i] for i in idx],
            None,
            self.times[idx[0]] if len(idx) else self.submitted,
        )

    def pending(self) -> list[Pending]:
        """The run as ``Pending`` items (what ``PendingQueue.close`` hands back)."""
        if self.futures is None:
            return [Pending("batch", self.ids, self.values, self.future, self.submitted)]  # type: ignore[arg-type]
        return [
            Pending("step", sid, self.values[i], self.futures[i], self.times[i])  # type: ignore[index]
            for i, sid in enumerate(self.ids)
        ]


Item = Pending | EventRun


def join_ids(parts: list[list[Any] | np.ndarray]) -> list[Any] | np.ndarray:
    """The stream ids of consecutive runs as one sequence: an ``int64`` array when every part is one
    (``submit_many`` with integer ids), else a list."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    return [sid for p in parts for sid in (p.tolist() if isinstance(p, np.ndarray) else p)]


def refuse_events(runs: list[EventRun], exc: StreamCapacityError) -> list[EventRun]:
    """Fail the events of ``runs`` that ``exc`` refused for capacity (``exc.indices``: into the runs' events
    in order); a ``submit_many`` batch with any refused fails whole, with an error naming its own refused
    events. Returns the runs left to step (nothing was applied)."""
    refused = np.zeros(sum(r.n for r in runs), dtype=bool)
    refused[exc.indices] = True
    left, lo = [], 0
    for r in runs:
        mine = refused[lo : lo + r.n]
        lo += r.n
        if not mine.any():
            left.append(r)
        elif r.is_batch:
            idx = np.flatnonzero(mine).tolist()
            refused_ids = r.ids[idx].tolist() if isinstance(r.ids, np.ndarray) else [r.ids[i] for i in idx]
            ids = list(dict.fromkeys(refused_ids))
            r.fail(StreamCapacityError(f"{len(idx)} events of this batch refused: {exc}", ids, idx))
        else:
            for i in np.flatnonzero(mine):
                r.futures[i].set_exception(exc)  # type: ignore[index]
            left.append(r.select(~mine))
    return left


def split_applied(
    runs: list[EventRun], exc: PartiallyAppliedError, output_size: int
) -> tuple[
    tuple[list[EventRun], np.ndarray] | None, list[EventRun], list[tuple[EventRun, PartiallyAppliedError]]
]:
    """After a failure part-way through ``runs``' events (``exc.applied``: indices into them, with
    ``exc.outputs``): the applied events as runs with their outputs ``(K, output_size)`` (None if none),
    the runs of events not applied, and each ``submit_many`` batch with only some applied, paired with the
    ``PartiallyAppliedError`` it fails with (indices into the batch)."""
    total = sum(r.n for r in runs)
    applied = np.zeros(total, dtype=bool)
    applied[exc.applied] = True
    outputs = np.empty((total, output_size), dtype=np.float32)
    outputs[exc.applied] = exc.outputs
    cause = exc.__cause__ or exc
    done: list[EventRun] = []
    done_rows: list[np.ndarray] = []
    failed: list[EventRun] = []
    partial: list[tuple[EventRun, PartiallyAppliedError]] = []
    lo = 0
    for r in runs:
        got, rows = applied[lo : lo + r.n], outputs[lo : lo + r.n]
        lo += r.n
        if got.all():
            done.append(r)
            done_rows.append(rows)
        elif not got.any():
            failed.append(r)
        elif r.is_batch:
            idx = np.flatnonzero(got)
            what = f"{len(idx)} of {r.n} events of this batch were applied before {type(cause).__name__}"
            error = PartiallyAppliedError(f"{what}: {cause}", idx, rows[idx])
            error.__cause__ = cause
            partial.append((r, error))
        else:
            done.append(r.select(got))
            done_rows.append(rows[got])
            failed.append(r.select(~got))
    return ((done, np.concatenate(done_rows)) if done else None), failed, partial


class PendingQueue:
    """A bounded FIFO between submitters and the step loop, counted in events.

    ``put_event`` appends one event to the open *events* run at the tail (one lock, one buffer row, no
    object per event besides its future); ``put`` queues a control or a ``submit_many`` batch, which closes
    the open run so that later events queue behind it. Both block while ``max_pending`` events wait
    (backpressure instead of unbounded memory; a batch waits until it fits, or the queue is empty).
    ``take_batch`` waits for the first item, then keeps collecting until ``max_batch`` events are queued
    or ``max_delay_s`` has passed since the first one arrived, whichever comes first.

    ``row_shape``/``row_dtype``: one event's input (``(feature_size,) float32``, or ``() int64`` for
    category ids); ``run_rows``: events per *events* run buffer.
    """

    def __init__(
        self,
        max_pending: int,
        row_shape: tuple[int, ...] = (),
        row_dtype: Any = np.float64,
        run_rows: int = 256,
    ) -> None:
        self.max_pending = max_pending
        self._items: deque[Item] = deque()
        self._events = 0  # events queued (a control counts as one)
        self._open: EventRun | None = None  # the tail run while put_event may still append to it
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._blocked = 0  # puts waiting for room
        self._loop_waiting = False
        self._closed = False
        self._row_shape = tuple(row_shape)
        self._row_dtype = np.dtype(row_dtype)
        self._run_rows = max(1, run_rows)

    def __len__(self) -> int:
        return self._events

    def put_event(self, stream_id: Any, x: Any, future: Future, now: float) -> None:
        """Queue one data event: ``x`` (one ``row_shape`` input) is copied into the open run."""
        with self._mutex:
            if self._events >= self.max_pending or self._closed:
                self._wait_for_room(1)
            run = self._open
            if run is None or run.n == self._run_rows:
                run = self._open = EventRun.events(self._run_rows, self._row_shape, self._row_dtype, now)
                self._items.append(run)
            i = run.n
            run.values[i] = x
            run.ids.append(stream_id)
            run.futures.append(future)  # type: ignore[union-attr]
            run.times.append(now)  # type: ignore[union-attr]
            run.n = i + 1
            self._events += 1
            # The loop sets _loop_waiting under this lock before its last emptiness check: either it saw
            # this event, or we see the flag here and wake it.
            if self._loop_waiting:
                self._cond.notify_all()

    def put(self, item: Item) -> None:
        """Queue a control or a batch behind everything queued so far."""
        with self._cond:
            if self._events + item.n > self.max_pending or self._closed:
                self._wait_for_room(item.n)
            self._open = None
            self._items.append(item)
            self._events += item.n
            if self._loop_waiting:
                self._cond.notify_all()

    def _wait_for_room(self, n: int) -> None:
        """Wait (the lock held) until ``n`` more events fit, or the queue is empty; raise once closed."""
        self._blocked += 1
        try:
            while self._events and self._events + n > self.max_pending and not self._closed:
                self._cond.wait(0.1)
        finally:
            self._blocked -= 1
        if self._closed:
            raise EngineClosedError("the engine is closed; it accepts no more events")

    def take_batch(
        self,
        max_batch: int,
        max_delay_s: float,
        idle_timeout_s: float,
        now: Callable[[], float] = time.monotonic,
    ) -> list[Item]:
        """Items holding up to ``max_batch`` events (empty after ``idle_timeout_s`` with nothing queued)."""
        if not self.wait_ready(max_batch, max_delay_s, idle_timeout_s, now):
            return []
        return self.pop(max_batch)

    def wait_ready(
        self,
        max_batch: int,
        max_delay_s: float,
        idle_timeout_s: float,
        now: Callable[[], float] = time.monotonic,
    ) -> bool:
        """Wait until a batch is ready to take: ``max_batch`` events queued, or ``max_delay_s`` after the
        first one arrived; False after ``idle_timeout_s`` with nothing queued. Takes nothing: another
        thread may ``pop`` the items meanwhile (the engine pops under its step lock)."""
        items = self._items
        if not items and not self._wait_for_first(idle_timeout_s):
            return False
        if max_delay_s > 0 and self._events < max_batch:
            try:
                deadline = items[0].submitted + max_delay_s
            except IndexError:  # popped meanwhile
                return bool(items)
            while self._events < max_batch and now() < deadline:
                time.sleep(min(50e-6, max(0.0, deadline - now())))
        return bool(items)

    def pop(self, max_events: int) -> list[Item]:
        """The oldest items, whole, holding up to ``max_events`` events (at least one item when any is
        queued: a batch larger than ``max_events`` comes alone); wakes blocked puts."""
        batch: list[Item] = []
        with self._cond:
            items = self._items
            taken = 0
            while items:
                n = items[0].n
                if batch and taken + n > max_events:
                    break
                item = items.popleft()
                if item is self._open:
                    self._open = None  # the loop owns it now: later events start a new run
                batch.append(item)
                taken += n
                if taken >= max_events:
                    break
            self._events -= taken
            if self._blocked and taken:
                self._cond.notify_all()
        return batch

    def _wait_for_first(self, timeout_s: float) -> bool:
        with self._cond:
            self._loop_waiting = True
            try:
                if not self._items and not self._closed:
                    self._cond.wait(timeout_s)
            finally:
                self._loop_waiting = False
        return bool(self._items)

    def close(self) -> list[Pending]:
        """Refuse further puts; return what was still queued, one ``Pending`` per event or batch."""
        with self._cond:
            self._closed = True
            rest = [
                p for item in self._items for p in (item.pending() if isinstance(item, EventRun) else [item])
            ]
            self._items.clear()
            self._open = None
            self._events = 0
            self._cond.notify_all()
        return rest

    @property
    def closed(self) -> bool:
        return self._closed
