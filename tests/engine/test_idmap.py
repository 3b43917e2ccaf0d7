"""``IdMap`` against a plain dict (and its inverse), through random mixes of every operation."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.idmap import IdMap

# Small int ranges make collisions, reuse of removed ids and long probe chains likely; huge ints and strs
# take the dict path; mixed batches exercise both at once.
ids = st.one_of(
    st.integers(-50, 400),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(2**63, 2**70),
    st.text(max_size=3),
)

op = st.one_of(
    st.tuples(st.just("add"), st.lists(ids, max_size=60)),
    st.tuples(st.just("remove"), st.lists(st.integers(0, 10_000), max_size=40)),
    st.tuples(st.just("move"), st.lists(st.integers(0, 10_000), max_size=20)),
    st.tuples(st.just("lookup"), st.lists(ids, max_size=60)),
    st.tuples(st.just("clear"), st.just([])),
)


class CollidingIdMap(IdMap):
    """Every int id hashes to one of 5 cells: long probe chains, removals in the middle of chains, and
    inserts reusing removed cells (the real hash makes these rare with small ids)."""

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return np.abs(keys % 5)


def _check(m: IdMap, ref: dict) -> None:
    assert len(m) == len(ref)
    assert dict(m.items()) == ref
    assert sorted(m, key=repr) == sorted(ref, key=repr)
    for sid, slot in ref.items():
        assert m.get(sid) == slot and sid in m and m.id_at(slot) == sid


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([IdMap, CollidingIdMap]), st.lists(op, max_size=40), st.randoms(use_true_random=False))
def test_idmap_behaves_like_a_dict_and_its_inverse(kind: type[IdMap], ops: list, rnd) -> None:
    m, ref = kind(), {}
    free = list(range(5_000))
    for name, arg in ops:
        if name == "add":
            new = [s for s in dict.fromkeys(arg) if s not in ref]
            slots = [free.pop(rnd.randrange(len(free))) for _ in new]
            m.add_many(new, slots)
            ref.update(zip(new, slots, strict=True))
        elif name == "remove" and ref:
            keys = list(ref)
            gone = list(dict.fromkeys(keys[i % len(keys)] for i in arg))
            out = m.remove_slots(np.array([ref[s] for s in gone], dtype=np.int64))
            assert out == gone
            for s in gone:
                free.append(ref.pop(s))
        elif name == "move" and ref:
            keys = list(ref)
            movers = list(dict.fromkeys(keys[i % len(keys)] for i in arg))
            targets = [free.pop(rnd.randrange(len(free))) for _ in movers]
            m.move_slots(np.array([ref[s] for s in movers], np.int64), np.array(targets, np.int64))
            for s, t in zip(movers, targets, strict=True):
                free.append(ref[s])
                ref[s] = t
        elif name == "lookup":
            got = m.lookup(arg)
            assert got.tolist() == [ref.get(s, -1) for s in arg]
            ints = [s for s in arg if isinstance(s, int) and -(2**63) <= s < 2**63]
            assert m.lookup(np.array(ints, dtype=np.int64)).tolist() == [ref.get(s, -1) for s in ints]
        elif name == "clear":
            m.clear()
            free.extend(ref.values())
            ref.clear()
        _check(m, ref)


def test_many_ids_grow_then_shrink_the_table() -> None:
    """100k ids in, all but 100 out: lookups stay right and the table's memory comes back."""
    m = IdMap()
    keys = np.arange(100_000, dtype=np.int64) * 7919 - 3
    m.add_many(keys.tolist(), np.arange(100_000))
    assert (m.lookup(keys) == np.arange(100_000)).all()
    big = m.nbytes()
    m.remove_slots(np.arange(100, 100_000))
    assert (m.lookup(keys[:100]) == np.arange(100)).all()
    assert (m.lookup(keys[100:]) == -1).all()
    m.add_many([1, "a"], [100, 101])
    assert m.lookup([1, "a", keys[5]]).tolist() == [100, 101, 5]
    assert m.nbytes() < big  # the hash table was rebuilt small (the per-slot arrays stay)
