"""The state store: slots, growth, release and reuse, initial states."""

from __future__ import annotations

import torch

from engine.state import LARGE_CAPACITY, StateStore, grown_capacity


def _store(capacity: int = 2) -> StateStore:
    initial = [torch.full((3,), 0.5), torch.zeros(2)]
    return StateStore(initial, torch.device("cpu"), capacity=capacity)


def test_new_streams_start_from_the_initial_state_and_growth_keeps_rows():
    store = _store(capacity=2)
    slots = store.slots_for(["a", "b"])
    store.scatter(torch.as_tensor(slots), [torch.ones(2, 3), torch.ones(2, 2) * 2])
    more = store.slots_for(["c", 7, "a"])
    assert store.capacity >= 4 and len(store) == 4
    assert more[2] == slots[0]
    rows = store.gather(torch.as_tensor(store.slots_for(["a", "b", "c", 7])))
    assert torch.equal(rows[0][:2], torch.ones(2, 3)) and torch.equal(rows[1][:2], torch.full((2, 2), 2.0))
    assert torch.equal(rows[0][2:], torch.full((2, 3), 0.5)) and torch.equal(rows[1][2:], torch.zeros(2, 2))


def test_released_slots_are_reused_with_a_fresh_state():
    store = _store()
    (slot,) = store.slots_for(["a"])
    store.scatter(torch.as_tensor([slot]), [torch.ones(1, 3), torch.ones(1, 2)])
    store.release("a")
    assert "a" not in store
    (again,) = store.slots_for(["b"])
    assert again == slot
    assert torch.equal(store.gather(torch.as_tensor([again]))[0], torch.full((1, 3), 0.5))


def test_growth_is_geometric_and_gentle_when_large():
    assert grown_capacity(1024, 1025) == 2048
    assert grown_capacity(LARGE_CAPACITY, LARGE_CAPACITY + 1) == LARGE_CAPACITY * 5 // 4
    cap = grown_capacity(1024, 1_000_000)
    assert 1_000_000 <= cap < 1_250_000
