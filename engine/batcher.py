"""The batcher: a bounded queue of pending events, and the plan that turns a batch into steps.

A batch may hold several events of one stream. ``plan_waves`` splits it into *waves*: wave ``k`` holds
the ``k``-th event of every stream in the batch, so a wave has at most one event per stream and running
the waves in order applies each stream's events strictly in arrival order.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import EngineClosedError


def plan_waves(slots: np.ndarray, by_slot: bool = False) -> list[np.ndarray]:
    """Split events into waves of distinct slots, preserving per-slot order.

    slots: ``(N,) int64``, the slot of each event in arrival order. Returns index arrays into the
    events; wave ``k`` holds every slot's ``k``-th event, in arrival order (``by_slot``: in ascending slot
    order, which a paged state store gathers without reordering). O(N log N).
    """
    n = len(slots)
    if n == 0:
        return []
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


@dataclass(slots=True)
class Pending:
    """One queued item: a data event (``op == "step"``) or a control (``start``/``reset``/``end``)."""

    op: str
    stream_id: Any
    x: Any
    future: Future
    submitted: float


class PendingQueue:
    """A bounded FIFO between submitters and the step loop.

    ``put`` blocks while ``max_pending`` items wait (backpressure instead of unbounded memory).
    ``take_batch`` waits for the first item, then keeps collecting until ``max_batch`` items or until
    ``max_delay_s`` has passed since the first one arrived, whichever comes first.
    """

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._items: deque[Pending] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._loop_waiting = False
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Pending) -> None:
        items = self._items
        if len(items) >= self.max_pending or self._closed:
            self._put_slow(item)
            return
        items.append(item)
        # The loop sets _loop_waiting before its last emptiness check, under the lock: either it sees
        # this item, or we see the flag here and wake it.
        if self._loop_waiting:
            with self._cond:
                self._cond.notify_all()

    def _put_slow(self, item: Pending) -> None:
        with self._cond:
            while len(self._items) >= self.max_pending and not self._closed:
                self._cond.wait(0.1)
            if self._closed:
                raise EngineClosedError("the engine is closed; it accepts no more events")
            self._items.append(item)
            self._cond.notify_all()

    def take_batch(
        self,
        max_batch: int,
        max_delay_s: float,
        idle_timeout_s: float,
        now: Callable[[], float] = time.monotonic,
    ) -> list[Pending]:
        """Up to ``max_batch`` items (empty after ``idle_timeout_s`` with nothing queued)."""
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
        """Wait until a batch is ready to take: ``max_batch`` items queued, or ``max_delay_s`` after the
        first one arrived; False after ``idle_timeout_s`` with nothing queued. Takes nothing: another
        thread may ``pop`` the items meanwhile (the engine pops under its step lock)."""
        items = self._items
        if not items and not self._wait_for_first(idle_timeout_s):
            return False
        if max_delay_s > 0 and len(items) < max_batch:
            try:
                deadline = items[0].submitted + max_delay_s
            except IndexError:  # popped meanwhile
                return bool(items)
            while len(items) < max_batch and now() < deadline:
                time.sleep(min(50e-6, max(0.0, deadline - now())))
        return bool(items)

    def pop(self, max_items: int) -> list[Pending]:
        """Up to ``max_items`` of the oldest items, at once (possibly none); wakes blocked ``put``s."""
        items = self._items
        batch = [items.popleft() for _ in range(min(max_items, len(items)))]
        if batch and len(items) < self.max_pending:
            with self._cond:
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
        """Refuse further puts; return what was still queued."""
        with self._cond:
            self._closed = True
            rest = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        return rest

    @property
    def closed(self) -> bool:
        return self._closed
