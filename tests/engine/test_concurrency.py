"""Many threads submitting to many streams at once: per-stream order holds, nothing is lost."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from engine import Engine

ATOL = 1e-5


def test_many_threads_many_streams(ref_factory):
    ref = ref_factory("gru", num_layers=2, hidden_size=16, head_out=2)
    threads_n, streams_per_thread, length = 8, 25, 30
    rng = np.random.default_rng(0)
    seqs = {
        (t, s): ref.random_inputs(rng, length) for t in range(threads_n) for s in range(streams_per_thread)
    }
    results: dict[tuple[int, int], list] = {key: [] for key in seqs}
    barrier = threading.Barrier(threads_n)

    def producer(t: int, engine: Engine) -> None:
        local = np.random.default_rng(100 + t)
        cursor = [0] * streams_per_thread
        order = [s for s in range(streams_per_thread) for _ in range(length)]
        local.shuffle(order)
        barrier.wait()
        for s in order:
            results[(t, s)].append(engine.submit(f"t{t}-s{s}", seqs[(t, s)][cursor[s]]))
            cursor[s] += 1

    with Engine(ref.model, device="cpu", max_batch=64, max_pending=500) as engine:
        workers = [threading.Thread(target=producer, args=(t, engine)) for t in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        outputs = {key: np.stack([f.result(timeout=60) for f in futs]) for key, futs in results.items()}
        stats = engine.stats()
    assert stats.events == threads_n * streams_per_thread * length
    assert stats.active_streams == threads_n * streams_per_thread
    assert stats.mean_batch_size > 1  # events of different streams really were batched together
    for key, seq in seqs.items():
        np.testing.assert_allclose(outputs[key], ref.run(seq), atol=ATOL, err_msg=str(key))


def test_async_submit(ref_factory):
    ref = ref_factory("lstm", hidden_size=6)
    rng = np.random.default_rng(1)
    seqs = {f"s{i}": ref.random_inputs(rng, 10) for i in range(5)}

    async def run_stream(engine: Engine, sid: str) -> np.ndarray:
        return np.stack([await engine.submit_async(sid, x) for x in seqs[sid]])

    async def main(engine: Engine) -> dict[str, np.ndarray]:
        outs = await asyncio.gather(*(run_stream(engine, sid) for sid in seqs))
        return dict(zip(seqs, outs, strict=True))

    with Engine(ref.model, device="cpu") as engine:
        got = asyncio.run(main(engine))
    for sid, seq in seqs.items():
        np.testing.assert_allclose(got[sid], ref.run(seq), atol=ATOL)


def test_close_drains_queued_events(ref_factory):
    """500 events still queued when ``close`` starts are all applied, in order: each output equals the
    offline run of its stream, and each stream's final state is the one after its last event."""
    ref = ref_factory("rnn_tanh", hidden_size=4)
    xs = ref.random_inputs(np.random.default_rng(2), 500)
    engine = Engine(ref.model, device="cpu", max_batch=7)
    with engine._lock:  # the step loop cannot apply anything (it steps under this lock) until close runs
        futures = [engine.submit(i % 13, x) for i, x in enumerate(xs)]
        assert not any(f.done() for f in futures)
        closer = threading.Thread(target=engine.close)
        closer.start()
        while not engine._closed:  # close has begun: the events are queued behind it
            time.sleep(0.001)
    closer.join(timeout=30)
    assert not closer.is_alive(), "close did not return"
    assert all(f.done() and f.exception() is None for f in futures)
    assert engine.stats().events == len(xs)
    for sid in range(13):
        expected = ref.run(xs[sid::13])
        got = np.stack([f.result() for f in futures[sid::13]])
        np.testing.assert_allclose(got, expected, atol=ATOL, err_msg=f"stream {sid}")
        (state,) = engine.state_of(sid)  # rnn_tanh without a head: the output is the hidden state
        np.testing.assert_allclose(state.numpy(), expected[-1], atol=ATOL, err_msg=f"stream {sid} state")


def test_the_step_loop_survives_a_failing_control_and_a_failing_sweep(ref_factory, monkeypatch):
    """A spill-store error in a control fails that control only; an error in the idle sweep is counted;
    the loop goes on serving (before, either killed the loop thread and ``end``/``start`` hung)."""
    import sqlite3
    import time

    import pytest

    ref = ref_factory("gru", input_size=3, hidden_size=4)
    with Engine(ref.model, device="cpu", ttl_s=0.01, sweep_interval_s=0.01) as engine:
        engine.submit("a", np.ones(3, np.float32)).result(timeout=5)
        store = engine._store
        real_reset = store.reset

        def broken_reset(stream_id):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store, "reset", broken_reset)
        with pytest.raises(sqlite3.OperationalError):
            engine.start("a")
        monkeypatch.setattr(store, "reset", real_reset)

        def broken_evict(now):
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(store, "evict_idle", broken_evict)
        time.sleep(0.2)  # several sweeps fail
        assert engine.stats().loop_errors >= 1
        out = engine.submit("b", np.ones(3, np.float32)).result(timeout=5)
        assert out.shape == (ref.model.output_size,)
        engine.start("a")  # controls work again
        assert engine.loop_alive


def _fail_second_step(monkeypatch, engine: Engine) -> None:
    """Make the model's second ``step`` call fail, as a device error in the middle of a batch would."""
    real_step = engine.model.step
    calls = []

    def step(x, state):
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real_step(x, state)

    monkeypatch.setattr(engine.model, "step", step)


def test_a_queued_batch_failing_after_its_first_wave_reports_what_happened(ref_factory, monkeypatch):
    """Events a1, b1, a2 in one batch run as waves [a1, b1], [a2]; the second wave fails. a1 and b1 were
    applied: they succeed and are counted (so weight_history's event indices stay right); a2 fails."""
    ref = ref_factory("gru", input_size=3, hidden_size=4)
    xs = ref.random_inputs(np.random.default_rng(5), 3)
    with Engine(ref.model, device="cpu", max_delay_ms=300) as engine:
        _fail_second_step(monkeypatch, engine)
        futures = [engine.submit(s, x) for s, x in zip(["a", "b", "a"], xs, strict=True)]
        np.testing.assert_allclose(futures[0].result(timeout=10), ref.run(xs[:1])[0], atol=ATOL)
        np.testing.assert_allclose(futures[1].result(timeout=10), ref.run(xs[1:2])[0], atol=ATOL)
        assert isinstance(futures[2].exception(timeout=10), RuntimeError)
        stats = engine.stats()
        assert stats.events == 2 and stats.errors == 1 and stats.loop_errors == 0
        (state,) = engine.state_of("a")  # gru without a head: the output is the hidden state
        np.testing.assert_allclose(state.numpy(), ref.run(xs[:1])[0], atol=ATOL)
        engine.swap_weights(engine.model.state_dict(), 1)
        assert engine.weight_history()[-1][:2] == (1, 2)


def test_step_many_failing_after_its_first_wave_names_the_applied_events(ref_factory, monkeypatch):
    import pytest

    from engine import PartiallyAppliedError

    ref = ref_factory("gru", input_size=3, hidden_size=4)
    xs = ref.random_inputs(np.random.default_rng(6), 3)
    with Engine(ref.model, device="cpu") as engine:
        _fail_second_step(monkeypatch, engine)
        with pytest.raises(PartiallyAppliedError) as info:
            engine.step_many(["a", "b", "a"], xs)
        assert info.value.applied.tolist() == [0, 1]
        np.testing.assert_allclose(info.value.outputs[0], ref.run(xs[:1])[0], atol=ATOL)
        np.testing.assert_allclose(info.value.outputs[1], ref.run(xs[1:2])[0], atol=ATOL)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert engine.stats().events == 2
        (state,) = engine.state_of("a")
        np.testing.assert_allclose(state.numpy(), ref.run(xs[:1])[0], atol=ATOL)
