"""Bad input gets a clear error for that event only; no other stream's state changes."""

from __future__ import annotations

import numpy as np
import pytest

from engine import (
    Engine,
    EngineClosedError,
    InvalidInputError,
    InvalidStreamIdError,
    UnknownStreamError,
)

ATOL = 1e-5
F = 3  # features per event in these tests


@pytest.fixture
def ref(ref_factory):
    return ref_factory("lstm", input_size=F, hidden_size=8, num_layers=2, head_out=2)


BAD_FEATURES = [
    ("too few features", np.zeros(F - 1, np.float32), "expected 3 features"),
    ("too many features", np.zeros(F + 1, np.float32), "expected 3 features"),
    ("matrix", np.zeros((F, 1), np.float32), "expected 3 features"),
    ("NaN", np.array([0.0, np.nan, 1.0], np.float32), "NaN or Inf"),
    ("Inf", np.array([0.0, 1.0, -np.inf]), "NaN or Inf"),
    ("int dtype", np.array([1, 2, 3]), "floating point"),
    ("bool dtype", np.array([True, False, True]), "floating point"),
    ("complex dtype", np.array([1j, 2, 3]), "floating point"),
    ("string", "1,2,3", "floating point"),
    ("ragged", [[1.0], [2.0, 3.0]], "not a numeric array"),
]


@pytest.mark.parametrize("name,bad,reason", BAD_FEATURES, ids=[b[0] for b in BAD_FEATURES])
def test_bad_features_are_refused_and_touch_nothing(ref, name, bad, reason):
    rng = np.random.default_rng(0)
    good = {s: ref.random_inputs(rng, 6) for s in ("a", "b", "victim")}
    with Engine(ref.model, device="cpu") as engine:
        outs = {s: [] for s in good}
        for t in range(6):
            for s, seq in good.items():
                outs[s].append(engine.submit(s, seq[t]).result())
            if t == 3:  # a bad event for "victim" in the middle of its sequence, and one for a new stream
                with pytest.raises(InvalidInputError, match=reason):
                    engine.submit("victim", bad)
                with pytest.raises(InvalidInputError, match=reason):
                    engine.submit("newcomer", bad)
                with pytest.raises(InvalidInputError):
                    engine.step_many(["victim"], [bad])
        assert "newcomer" not in engine
        assert engine.stats().events == 18
    for s, seq in good.items():
        np.testing.assert_allclose(np.stack(outs[s]), ref.run(seq), atol=ATOL, err_msg=s)


def test_step_many_refuses_the_whole_call_and_names_the_bad_event(ref):
    rng = np.random.default_rng(1)
    with Engine(ref.model, device="cpu") as engine:
        engine.step_many(["a", "b"], ref.random_inputs(rng, 2))
        before = {s: engine.state_of(s) for s in ("a", "b")}
        xs = ref.random_inputs(rng, 4)
        xs[2, 1] = np.nan
        with pytest.raises(InvalidInputError, match="event 2"):
            engine.step_many(["a", "b", "c", "a"], xs)
        with pytest.raises(InvalidInputError, match="shape"):
            engine.step_many(["a", "b"], ref.random_inputs(rng, 3))
        for s, state in before.items():
            for got, want in zip(engine.state_of(s), state, strict=True):
                np.testing.assert_array_equal(got, want)
        assert "c" not in engine


@pytest.mark.parametrize("bad_id", [1.5, None, b"bytes", ("t",), True])
def test_bad_stream_ids(ref, bad_id):
    x = np.zeros(F, np.float32)
    with Engine(ref.model, device="cpu") as engine:
        with pytest.raises(InvalidStreamIdError, match="stream id must be str or int"):
            engine.submit(bad_id, x)
        with pytest.raises(InvalidStreamIdError):
            engine.step_many(["ok", bad_id], np.zeros((2, F), np.float32))
        assert engine.active_streams == 0


def test_unknown_stream_on_end_and_reset(ref):
    with Engine(ref.model, device="cpu") as engine:
        out = engine.submit("a", np.ones(F, np.float32)).result()
        with pytest.raises(UnknownStreamError, match="unknown stream 'ghost'"):
            engine.end("ghost")
        with pytest.raises(UnknownStreamError):
            engine.reset("ghost")
        assert "ghost" not in engine
        np.testing.assert_allclose(engine.end("a"), out, atol=ATOL)


def test_categorical_inputs_are_checked(ref_factory):
    ref = ref_factory("gru", num_embeddings=5, hidden_size=4)
    with Engine(ref.model, device="cpu") as engine:
        for bad, reason in [(5, r"outside \[0, 5\)"), (-1, "outside"), (1.0, "integer"), ([1, 2], "integer")]:
            with pytest.raises(InvalidInputError, match=reason):
                engine.submit("s", bad)
        with pytest.raises(InvalidInputError, match="event 1: category id 9"):
            engine.step_many(["s", "t"], np.array([1, 9]))
        assert engine.active_streams == 0
        np.testing.assert_allclose(engine.submit("s", 3).result(), ref.run(np.array([3]))[0], atol=ATOL)


def test_closed_engine_refuses_everything(ref):
    engine = Engine(ref.model, device="cpu")
    engine.submit("a", np.zeros(F, np.float32)).result()
    engine.close()
    engine.close()  # idempotent
    for call in (
        lambda: engine.submit("a", np.zeros(F, np.float32)),
        lambda: engine.step_many(["a"], np.zeros((1, F), np.float32)),
        lambda: engine.end("a"),
        lambda: engine.start("a"),
    ):
        with pytest.raises(EngineClosedError, match="closed"):
            call()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_batch_finiteness_check_is_exact(bad):
    """The batch check is one sum when all is well: huge finite values whose sum overflows pass, and a
    non-finite value anywhere is named by its row, whatever else the batch holds."""
    from engine.inputs import check_feature_batch

    huge = np.full((64, 3), np.finfo(np.float32).max, dtype=np.float32)
    assert check_feature_batch(huge, 64, 3) is huge
    for row in (0, 17, 63):
        xs = huge.copy() if row != 17 else np.zeros((64, 3), np.float32)
        xs[row, 1] = bad
        with pytest.raises(InvalidInputError, match=f"event {row}: features contain NaN or Inf"):
            check_feature_batch(xs, 64, 3)
