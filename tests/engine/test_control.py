"""Control events: start, reset, end; they apply in order with the stream's queued events."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Engine, RefusedEndError, UnknownStreamError

ATOL = 1e-5


def test_end_returns_the_final_output_and_frees_the_stream(ref_factory):
    ref = ref_factory("lstm", num_layers=2, head_out=3, head_kind="classifier")
    seq = ref.random_inputs(np.random.default_rng(0), 8)
    with Engine(ref.model, device="cpu") as engine:
        for x in seq:
            engine.submit("utt", x)  # not waited for: end() must run after them
        final = engine.end("utt")
        assert "utt" not in engine and engine.active_streams == 0
    np.testing.assert_allclose(final, ref.run(seq)[-1], atol=ATOL)
    assert abs(final.sum() - 1) < 1e-5


def test_end_without_head_returns_top_hidden_state(ref_factory):
    ref = ref_factory("gru", num_layers=3)
    seq = ref.random_inputs(np.random.default_rng(1), 5)
    with Engine(ref.model, device="cpu") as engine:
        engine.step_many(["s"] * 5, seq)
        np.testing.assert_allclose(engine.end("s"), ref.run(seq)[-1], atol=ATOL)


def test_start_and_reset_go_back_to_the_initial_state(ref_factory):
    ref = ref_factory("rnn_tanh", hidden_size=5)
    rng = np.random.default_rng(2)
    first, second = ref.random_inputs(rng, 4), ref.random_inputs(rng, 4)
    with Engine(ref.model, device="cpu") as engine:
        engine.start("s")  # a brand-new stream
        for x in first:
            engine.submit("s", x)
        engine.reset("s")
        outs = [engine.submit("s", x) for x in second]
        np.testing.assert_allclose(np.stack([f.result() for f in outs]), ref.run(second), atol=ATOL)
        engine.step_many(["s"], first[:1])
        engine.start("s")  # start on a known stream restarts it
        np.testing.assert_allclose(engine.step_many(["s"] * 4, second), ref.run(second), atol=ATOL)


def test_stats_count_events_batches_and_latency(ref_factory):
    ref = ref_factory("lstm")
    rng = np.random.default_rng(3)
    with Engine(ref.model, device="cpu", max_batch=8) as engine:
        futures = [engine.submit(f"s{i % 5}", x) for i, x in enumerate(ref.random_inputs(rng, 40))]
        for f in futures:
            f.result()
        engine.step_many(["a", "b"], ref.random_inputs(rng, 2))
        stats = engine.stats()
    assert stats.events == 42 and stats.active_streams == 7
    assert stats.batches >= 40 / 8
    assert 1 <= stats.mean_batch_size <= 8
    assert 0 < stats.latency_p50_ms <= stats.latency_p99_ms <= stats.latency_max_ms
    assert stats.pending == 0 and stats.errors == 0 and stats.device == "cpu"


def test_ends_queued_together_run_as_one_batch_with_each_streams_own_output(ref_factory):
    ref = ref_factory("gru", num_layers=2, head_out=2)
    rng = np.random.default_rng(4)
    seqs = {f"s{k}": ref.random_inputs(rng, 3 + k) for k in range(4)}
    batches: list[int] = []
    with Engine(ref.model, device="cpu") as engine:
        end_output = engine.model.end_output
        engine.model.end_output = lambda state: batches.append(len(state[0])) or end_output(state)
        for sid, seq in seqs.items():
            for x in seq:
                engine.submit(sid, x)
        finals = engine.end_many(["s2", "s0", "s3"])
        assert batches == [3] and engine.active_streams == 1
        last, gone = engine.end_many(["s1", "gone"])
        assert isinstance(gone, UnknownStreamError) and "s1" not in engine
    np.testing.assert_allclose(last, ref.run(seqs["s1"])[-1], atol=ATOL)
    for row, sid in zip(finals, ["s2", "s0", "s3"], strict=True):
        np.testing.assert_allclose(row, ref.run(seqs[sid])[-1], atol=ATOL)


def test_an_end_the_model_refuses_fails_alone_and_is_counted(ref_factory):
    ref = ref_factory("rnn_tanh", hidden_size=4, head_out=2)
    rng = np.random.default_rng(5)
    seqs = {sid: ref.random_inputs(rng, 3) for sid in ("a", "b", "c")}
    with Engine(ref.model, device="cpu") as engine:
        engine.model.end_refusals = lambda state: [None, "too long, say", None]  # b's end refused
        for sid, seq in seqs.items():
            engine.step_many([sid] * 3, seq)
        a, b, c = engine.end_many(["a", "b", "c"])
        assert isinstance(b, RefusedEndError) and str(b) == "stream 'b': too long, say"
        with pytest.raises(RefusedEndError):  # end() raises it
            engine.step_many(["b"], seqs["b"][:1])
            engine.model.end_refusals = lambda state: ["too long"]
            engine.end("b")
        assert engine.active_streams == 0 and engine.stats().refused_ends == 2
    np.testing.assert_allclose(a, ref.run(seqs["a"])[-1], atol=ATOL)
    np.testing.assert_allclose(c, ref.run(seqs["c"])[-1], atol=ATOL)
