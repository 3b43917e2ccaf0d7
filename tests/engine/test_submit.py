"""The submit path: ``submit_many`` (one queued item per batch), the events' futures (``EventFuture``),
inputs copied when queued, and refusals of bad input before anything is queued."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import FIRST_COMPLETED, InvalidStateError, as_completed, wait

import numpy as np
import pytest
import torch

from engine import (
    Engine,
    EngineClosedError,
    InvalidInputError,
    PartiallyAppliedError,
    StreamCapacityError,
)
from engine.batcher import EventFuture
from models.stream_model import ModelSpec, StreamModel

ATOL = 1e-5


def _gru(seed: int = 0) -> StreamModel:
    torch.manual_seed(seed)
    return StreamModel(ModelSpec("gru", 3, 8)).eval()


# ---- submit_many ------------------------------------------------------------------------------------------
def test_submit_many_equals_the_module_and_keeps_order_with_submit_and_controls(ref_factory):
    ref = ref_factory("lstm", input_size=3, hidden_size=8, num_layers=2, head_out=2)
    rng = np.random.default_rng(0)
    seqs = {s: ref.random_inputs(rng, 12) for s in ("a", "b", "c")}
    with Engine(ref.model, device="cpu", max_batch=5) as engine:
        with engine._lock:  # everything below queues before the loop takes any of it
            first = [engine.submit(s, seqs[s][0]) for s in ("a", "b")]
            ids = ["a", "b", "a", "c", "a"]
            rows = [seqs["a"][1], seqs["b"][1], seqs["a"][2], seqs["c"][0], seqs["a"][3]]
            many = engine.submit_many(ids, np.stack(rows))
            engine._control("reset", "b")
            flat = [seqs[s][k] for k in range(3) for s in ("b", "c")]  # b0 c0 b1 c1 b2 c2
            after = engine.submit_many(["b", "c"] * 3, np.stack(flat))
        np.testing.assert_allclose(first[0].result(timeout=10), ref.run(seqs["a"][:1])[0], atol=ATOL)
        np.testing.assert_allclose(first[1].result(timeout=10), ref.run(seqs["b"][:1])[0], atol=ATOL)
        out = many.result(timeout=10)
        assert out.shape == (5, 2) and out.dtype == np.float32
        want = [ref.run(seqs["a"][:2])[1], ref.run(seqs["b"][:2])[1], ref.run(seqs["a"][:3])[2]]
        want += [ref.run(seqs["c"][:1])[0], ref.run(seqs["a"][:4])[3]]
        np.testing.assert_allclose(out, np.stack(want), atol=ATOL)
        # b was reset: it restarts from its inputs 0, 1, 2; c continues after its input 0
        got = after.result(timeout=10)
        b_seq, c_seq = np.stack(flat[0::2]), np.concatenate([seqs["c"][:1], np.stack(flat[1::2])])
        np.testing.assert_allclose(got[0::2], ref.run(b_seq), atol=ATOL)
        np.testing.assert_allclose(got[1::2], ref.run(c_seq)[1:], atol=ATOL)
        assert engine.stats().events == 2 + 5 + 6


def test_submit_many_matches_step_many_on_many_streams(ref_factory):
    ref = ref_factory("rnn_tanh", input_size=4, hidden_size=16)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, 3000)
    xs = rng.standard_normal((3000, 4)).astype(np.float32)
    with Engine(ref.model, device="cpu", max_batch=64) as one, Engine(ref.model, device="cpu") as other:
        futures = [one.submit_many(ids[i : i + 300], xs[i : i + 300]) for i in range(0, 3000, 300)]
        got = np.concatenate([f.result(timeout=30) for f in futures])
        np.testing.assert_allclose(got, other.step_many(ids, xs), atol=ATOL)


def test_submit_many_refuses_a_bad_event_before_anything_is_queued():
    xs = np.ones((3, 3), np.float32)
    xs[2, 1] = np.inf
    with Engine(_gru(), device="cpu") as engine:
        with engine._lock:
            with pytest.raises(InvalidInputError, match="event 2"):
                engine.submit_many(["a", "b", "c"], xs)
            with pytest.raises(InvalidInputError):
                engine.submit_many(["a", "b"], np.ones((3, 3), np.float32))  # 3 rows for 2 ids
            with pytest.raises(Exception, match="stream id"):
                engine.submit_many(["a", 1.5], np.ones((2, 3), np.float32))
            assert len(engine._queue) == 0
        assert engine.active_streams == 0 and engine.stats().events == 0
        assert engine.submit_many([], np.zeros((0, 3), np.float32)).result(timeout=1).shape == (0, 8)


def test_submit_many_copies_the_callers_array_and_submit_copies_the_row():
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((4, 3)).astype(np.float32)
    with Engine(_gru(), device="cpu") as plain:
        want = plain.step_many(["a", "b", "a", "b"], xs)
    with Engine(_gru(), device="cpu") as engine:
        buf = xs.copy()
        with engine._lock:  # the loop cannot run them before the caller reuses its arrays
            many = engine.submit_many(["a", "b"], buf[:2])
            row = buf[2].copy()
            one = engine.submit("a", row)
            buf[:] = 0.0
            row[:] = 0.0
            tensor = torch.from_numpy(xs[3:4].copy())
            last = engine.submit_many(["b"], tensor)
            tensor.zero_()
        np.testing.assert_allclose(many.result(timeout=10), want[:2], atol=ATOL)
        np.testing.assert_allclose(one.result(timeout=10), want[2], atol=ATOL)
        np.testing.assert_allclose(last.result(timeout=10), want[3:], atol=ATOL)


def test_submit_many_waits_for_room_under_max_pending():
    xs = np.ones((4, 3), np.float32)
    with Engine(_gru(), device="cpu", max_pending=6) as engine:
        done = threading.Event()
        with engine._lock:  # the loop cannot take anything
            first = engine.submit_many(list("abcd"), xs)

            def second() -> None:
                engine.submit_many(list("efgh"), xs)  # 4 + 4 > 6: waits for the loop
                done.set()

            threading.Thread(target=second, daemon=True).start()
            assert not done.wait(0.2)
            assert len(engine._queue) == 4
        assert done.wait(10)
        first.result(timeout=10)
        big = engine.submit_many(list("abcdefgh") * 2, np.ones((16, 3), np.float32))  # > max_pending, alone
        assert big.result(timeout=10).shape == (16, 8)


def test_a_submit_many_batch_with_a_refused_stream_fails_whole_and_the_rest_runs():
    xs = np.random.default_rng(4).standard_normal((6, 3)).astype(np.float32)
    with Engine(_gru(), device="cpu", max_streams=2, max_delay_ms=300) as engine:
        with engine._lock:
            a = engine.submit("a", xs[0])
            batch = engine.submit_many(["b", "c", "b"], xs[1:4])  # c is a third stream: no room
            after = engine.submit_many(["a", "b"], xs[4:6])
        exc = batch.exception(timeout=10)
        assert isinstance(exc, StreamCapacityError)
        assert exc.indices == [1] and exc.stream_ids == ["c"]
        with Engine(_gru(), device="cpu") as plain:
            want = plain.step_many(["a", "a", "b"], xs[[0, 4, 5]])
        np.testing.assert_allclose(a.result(timeout=10), want[0], atol=ATOL)
        np.testing.assert_allclose(after.result(timeout=10), want[1:], atol=ATOL)  # b's batch changed nothing
        assert engine.stats().events == 3


def test_a_submit_many_batch_failing_after_its_first_wave_names_its_applied_events(ref_factory, monkeypatch):
    ref = ref_factory("gru", input_size=3, hidden_size=4)
    xs = ref.random_inputs(np.random.default_rng(6), 4)
    with Engine(ref.model, device="cpu") as engine:
        real_step, calls = engine.model.step, []

        def step(x, state):
            calls.append(len(x))
            if len(calls) == 2:
                raise RuntimeError("device lost")
            return real_step(x, state)

        monkeypatch.setattr(engine.model, "step", step)
        with engine._lock:
            single = engine.submit("z", xs[3])
            batch = engine.submit_many(["a", "b", "a"], xs[:3])
        np.testing.assert_allclose(single.result(timeout=10), ref.run(xs[3:4])[0], atol=ATOL)
        exc = batch.exception(timeout=10)
        assert isinstance(exc, PartiallyAppliedError) and isinstance(exc.__cause__, RuntimeError)
        assert exc.applied.tolist() == [0, 1]
        np.testing.assert_allclose(
            exc.outputs, np.stack([ref.run(xs[:1])[0], ref.run(xs[1:2])[0]]), atol=ATOL
        )
        stats = engine.stats()
        assert stats.events == 3 and stats.errors == 1


def test_submit_many_async_and_after_close():
    xs = np.ones((2, 3), np.float32)
    engine = Engine(_gru(), device="cpu")
    out = asyncio.run(engine.submit_many_async(["a", "b"], xs))
    assert out.shape == (2, 8)
    with engine._lock:
        queued = engine.submit_many(["a", "b"], xs)
    engine.close()  # applies what was queued
    assert queued.result(timeout=1).shape == (2, 8)
    with pytest.raises(EngineClosedError):
        engine.submit_many(["a"], xs[:1])


def test_float32_inf_and_nan_take_the_full_check(ref_factory):
    with Engine(_gru(), device="cpu") as engine:
        for bad in (np.array([0.0, np.inf, 1.0], np.float32), np.array([np.nan, 0, 0], np.float32)):
            with pytest.raises(InvalidInputError, match="NaN or Inf"):
                engine.submit("a", bad)
        big = np.array([1e300, 0, 0])  # finite float64, Inf once float32
        with pytest.raises(InvalidInputError, match="NaN or Inf"):
            engine.submit("a", big)
        assert "a" not in engine


def test_a_categorical_model_takes_only_integer_ids_through_submit(ref_factory):
    ref = ref_factory("gru", hidden_size=4, num_embeddings=5)
    with Engine(ref.model, device="cpu") as engine:
        for bad in (np.float32(1.0), np.array(1.0, np.float32), np.array([1.0], np.float32), 7):
            with pytest.raises(InvalidInputError):
                engine.submit("s", bad)
        np.testing.assert_allclose(
            engine.submit("s", 3).result(timeout=10), ref.run(np.array([3]))[0], atol=ATOL
        )
        np.testing.assert_allclose(
            engine.submit_many(["s", "s"], np.array([1, 2])).result(timeout=10),
            ref.run(np.array([3, 1, 2]))[1:],
            atol=ATOL,
        )


# ---- EventFuture ------------------------------------------------------------------------------------------
def test_event_future_behaves_as_a_future():
    f = EventFuture()
    seen = []
    f.add_done_callback(seen.append)
    assert not f.done() and not f.cancel() and not f.cancelled()
    f.set_result(3)
    assert f.done() and f.result() == 3 and f.exception() is None and seen == [f]
    f.add_done_callback(seen.append)  # done already: runs now
    assert seen == [f, f]
    with pytest.raises(InvalidStateError):
        f.set_result(4)
    g = EventFuture()
    g.set_exception(ValueError("x"))
    with pytest.raises(ValueError):
        g.result()
    assert isinstance(g.exception(), ValueError)
    h = EventFuture()
    assert wait([h, f], timeout=0.01, return_when=FIRST_COMPLETED).done == {f}
    threading.Timer(0.05, h.set_result, args=(5,)).start()
    assert [x.result() for x in as_completed([h], timeout=10)] == [5]

    async def awaited() -> int:
        k = EventFuture()
        threading.Timer(0.05, k.set_result, args=(7,)).start()
        return await asyncio.wrap_future(k)

    assert asyncio.run(awaited()) == 7


def test_event_futures_wake_every_waiter_and_run_every_callback_once_under_races():
    """Threads wait on, add callbacks to and wait() for futures while another thread sets them: no lost
    wake-up (a waiter would time out) and no callback lost or run twice."""
    n = 3000
    futures = [EventFuture() for _ in range(n)]
    calls = [0] * n
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def setter() -> None:
        start.wait()
        for i, f in enumerate(futures):
            f.set_result(i)

    def waiter() -> None:
        start.wait()
        try:
            for i in range(0, n, 7):
                assert futures[i].result(timeout=30) == i
        except BaseException as exc:
            errors.append(exc)

    def callbacks() -> None:
        start.wait()
        for i, f in enumerate(futures):
            f.add_done_callback(lambda _f, i=i: calls.__setitem__(i, calls[i] + 1))

    def waits() -> None:
        start.wait()
        try:
            for i in range(3, n, 11):
                assert not wait([futures[i]], timeout=30).not_done
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=t) for t in (setter, waiter, callbacks, waits)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert calls == [1] * n
