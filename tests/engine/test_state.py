"""The state store: slots, paged growth, release and reuse, initial states, limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import StreamCapacityError
from engine.state import StateStore


def _store(capacity: int = 2, **kwargs) -> StateStore:
    initial = [torch.full((3,), 0.5), torch.zeros(2)]
    return StateStore(initial, torch.device("cpu"), capacity=capacity, **kwargs)


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


def _rows(store: StateStore, ids: list) -> np.ndarray:
    """The streams' state rows concatenated: ``(N, 5)``."""
    return torch.cat(store.gather(store.slots_for(ids)), dim=1).numpy()


def _write(store: StateStore, ids: list, rows: np.ndarray) -> None:
    parts = torch.split(torch.from_numpy(rows.astype(np.float32)), store.widths, dim=1)
    store.scatter(store.slots_for(ids), list(parts))


def test_growth_adds_pages_without_copying_the_state_held():
    """The first page doubles up to ``page_rows``; past it each growth adds a page, and the pages already
    held are neither copied nor moved (growth no longer stops the world for a copy of all state)."""
    store = _store(capacity=2, page_rows=4)
    _write(store, ["s0", "s1"], np.ones((2, 5)))
    store.slots_for(["s2"])
    assert store.capacity == 4 and len(store.pages) == 1
    first_page = [t.data_ptr() for t in store.pages[0]]
    ids = [f"s{i}" for i in range(11)]
    rows = np.arange(55, dtype=np.float32).reshape(11, 5)
    _write(store, ids, rows)
    assert len(store.pages) == 3 and store.capacity == 12
    assert [t.data_ptr() for t in store.pages[0]] == first_page
    np.testing.assert_array_equal(_rows(store, ids), rows)
    assert store.nbytes == 12 * store.row_bytes()  # at most one page beyond the streams held


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["write", "release", "evict"]), st.lists(st.integers(0, 30))), max_size=30
    )
)
def test_paged_store_matches_a_dictionary_of_rows(ops):
    """Random writes, releases and LRU evictions across pages of 4 rows: every stream reads back what was
    last written (initial state when new), and pages come back once the streams fit below them."""
    store = _store(capacity=1, page_rows=4)
    model: dict[int, np.ndarray] = {}
    initial = np.array([0.5, 0.5, 0.5, 0, 0], np.float32)
    rng = np.random.default_rng(0)
    for op, streams in ops:
        ids = list(dict.fromkeys(streams))
        if op == "write" and ids:
            before = _rows(store, ids)
            for sid, row in zip(ids, before, strict=True):
                np.testing.assert_array_equal(row, model.get(sid, initial))
            rows = rng.standard_normal((len(ids), 5)).astype(np.float32)
            _write(store, ids, rows)
            model.update(zip(ids, rows, strict=True))
        elif op == "release":
            for sid in ids:
                store.release(sid)
                model.pop(sid, None)
        elif op == "evict" and len(store):
            store.ttl_s = 0.0
            store.evict_idle(float("inf"))
            model.clear()
        assert len(store) == len(model)
        pages_needed = max(1, -(-len(model) // 4))
        assert len(store.pages) <= pages_needed + 1
    if model:
        np.testing.assert_array_equal(_rows(store, list(model)), np.stack(list(model.values())))


def test_memory_comes_back_after_streams_go():
    store = _store(capacity=4, page_rows=4)
    ids = list(range(40))
    rows = np.arange(200, dtype=np.float32).reshape(40, 5)
    _write(store, ids, rows)
    assert len(store.pages) == 10
    for sid in ids[:-3]:
        store.release(sid)
    assert len(store.pages) == 1 and store.nbytes == 4 * store.row_bytes()
    np.testing.assert_array_equal(_rows(store, ids[-3:]), rows[-3:])


def test_max_streams_evicts_the_least_recently_used_stream_not_in_use():
    store = _store(capacity=2, max_streams=3)
    dropped: list = []
    store.on_drop = dropped.extend
    for t, sid in enumerate(["a", "b", "c"]):
        store.touch(store.slots_for([sid]), float(t))
    store.touch(store.slots_for(["a"]), 10.0)  # "b" is now the least recently used
    store.slots_for(["d"])
    assert dropped == ["b"] and sorted(store.slot_of) == ["a", "c", "d"]
    store.slots_for(["a", "e", "f"])  # "a" is in use by the call: "c" and "d" go, never "a"
    assert sorted(store.slot_of) == ["a", "e", "f"] and store.evictions_for_capacity == 3
    with pytest.raises(StreamCapacityError) as info:
        store.slots_for(["a", "e", "f", "g", "h", "g"])  # every held stream is in use: g and h are refused
    assert info.value.stream_ids == ["g", "h"] and info.value.indices == [3, 4, 5]
    assert sorted(store.slot_of) == ["a", "e", "f"] and store.refused_streams == 2  # nothing changed


def test_max_bytes_caps_the_state_tensors():
    row = 5 * 4
    store = _store(capacity=2, page_rows=4, max_bytes=6 * row)
    store.slots_for(list(range(6)))
    assert store.nbytes == 6 * row and store.capacity == 6
    store.slots_for([6, 7])  # no room to grow: two streams are evicted instead
    assert store.nbytes <= 6 * row and len(store) == 6 and store.evictions_for_capacity == 2
    with pytest.raises(ValueError, match="cannot hold one stream"):
        _store(max_bytes=row - 1)


def test_import_under_a_limit_evicts_others_or_refuses_without_changing_anything():
    store = _store(capacity=2, max_streams=2)
    _write(store, ["keep"], np.ones((1, 5)))
    rows = [torch.full((3, 3), 2.0), torch.full((3, 2), 3.0)]
    with pytest.raises(StreamCapacityError) as info:
        store.import_(["a", "b", "c"], rows, now=1.0, replace=True)
    assert info.value.stream_ids == ["c"] and info.value.indices == [2]
    assert list(store.slot_of) == ["keep"] and store.refused_streams == 1
    np.testing.assert_array_equal(_rows(store, ["keep"]), np.ones((1, 5)))
    store.import_(["a", "b"], [r[:2] for r in rows], now=1.0, replace=False)  # "keep" makes room
    assert sorted(store.slot_of) == ["a", "b"] and store.evictions_for_capacity == 1
    np.testing.assert_array_equal(_rows(store, ["a"]), [[2, 2, 2, 3, 3]])


def test_capacity_eviction_takes_a_share_of_the_streams_at_once():
    """At the limit, one search for the least recently used frees 1/256 of the streams held, so a stream of
    new ones does not pay an O(streams) search each."""
    store = _store(capacity=512, max_streams=512)
    for k in range(512):
        store.touch(store.slots_for([k]), float(k))
    store.slots_for(["new"])
    assert store.evictions_for_capacity == 2 and 0 not in store and 1 not in store and 2 in store
    store.slots_for(["newer"])  # the free slot left by the share: no search, no eviction
    assert store.evictions_for_capacity == 2 and len(store) == 512
