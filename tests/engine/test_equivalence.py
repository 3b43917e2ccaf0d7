"""The correctness contract: events stepped one at a time, streams interleaved in any order, through
``submit`` and ``step_many``, give the outputs of the torch module run over each whole sequence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Engine
from models.cells import GRU_SERVING_MIN_ROWS, LSTM_FUSED_MIN_ROWS

ATOL = RTOL = 1e-5


@st.composite
def scenarios(draw):
    cfg = dict(
        kind=draw(st.sampled_from(["rnn_tanh", "rnn_relu", "gru", "lstm"])),
        num_layers=draw(st.integers(1, 3)),
        input_size=draw(st.integers(1, 6)),
        hidden_size=draw(st.integers(1, 12)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        num_embeddings=draw(st.sampled_from([0, 0, 7])),
        head_out=draw(st.sampled_from([0, 0, 3])),
        seed=draw(st.integers(0, 2**16)),
    )
    if cfg["kind"] == "lstm" and cfg["hidden_size"] > 1 and draw(st.booleans()):
        cfg["proj_size"] = draw(st.integers(1, cfg["hidden_size"] - 1))
    lengths = draw(st.lists(st.integers(1, 15), min_size=1, max_size=8))
    order = draw(st.permutations([s for s, n in enumerate(lengths) for _ in range(n)]))
    # Cut the interleaved event list into chunks; each goes through submit or step_many.
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=6)))
    modes = draw(
        st.lists(st.sampled_from(["submit", "step_many"]), min_size=len(cuts) + 1, max_size=len(cuts) + 1)
    )
    int_ids = draw(st.booleans())
    return cfg, lengths, order, cuts, modes, int_ids


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_interleaved_streams_equal_whole_sequence_runs(ref_factory, scenario):
    cfg, lengths, order, cuts, modes, int_ids = scenario
    ref = ref_factory(**cfg)
    rng = np.random.default_rng(cfg["seed"])
    seqs = [ref.random_inputs(rng, n) for n in lengths]
    expected = [ref.run(s) for s in seqs]
    sid = (lambda s: 1000 + s) if int_ids else (lambda s: f"stream-{s}")

    # Events in interleaved order: (stream, timestep).
    cursor = [0] * len(lengths)
    events = []
    for s in order:
        events.append((s, cursor[s]))
        cursor[s] += 1

    got = [np.full_like(e, np.nan) for e in expected]
    with Engine(ref.model, device="cpu", max_batch=5, capacity=2) as engine:
        bounds = [0, *cuts, len(events)]
        for (lo, hi), mode in zip(itertools.pairwise(bounds), modes, strict=True):
            chunk = events[lo:hi]
            if not chunk:
                continue
            ids = [sid(s) for s, _ in chunk]
            xs = np.stack([seqs[s][t] for s, t in chunk])
            if mode == "step_many":
                outs = engine.step_many(ids, xs)
            else:
                futures = [engine.submit(i, x) for i, x in zip(ids, xs, strict=True)]
                outs = [f.result(timeout=30) for f in futures]
            for (s, t), out in zip(chunk, outs, strict=True):
                got[s][t] = out
    for s in range(len(lengths)):
        np.testing.assert_allclose(got[s], expected[s], atol=ATOL, rtol=RTOL, err_msg=f"stream {s}")


def test_one_stream_many_events_in_one_call(ref_factory):
    """A stream repeated inside one ``step_many`` call has its events applied in order."""
    ref = ref_factory("gru", num_layers=2, hidden_size=6)
    rng = np.random.default_rng(3)
    seq_a, seq_b = ref.random_inputs(rng, 40), ref.random_inputs(rng, 3)
    ids = ["a"] * 20 + ["b"] * 3 + ["a"] * 20
    xs = np.concatenate([seq_a[:20], seq_b, seq_a[20:]])
    with Engine(ref.model, device="cpu") as engine:
        out = engine.step_many(ids, xs)
    np.testing.assert_allclose(np.concatenate([out[:20], out[23:]]), ref.run(seq_a), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(out[20:23], ref.run(seq_b), atol=ATOL, rtol=RTOL)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_one_stream_s_events_in_one_call_take_the_sequence_kernel_path(ref_factory, scenario):
    """All of ``step_many``'s events of one stream (the engine runs them with each layer's sequence
    kernel, ``StreamModel.steps``) give the whole-sequence outputs, for every cell and option."""
    cfg, lengths, *_ = scenario
    ref = ref_factory(**cfg)
    seq = ref.random_inputs(np.random.default_rng(cfg["seed"]), sum(lengths) + 2)
    with Engine(ref.model, device="cpu") as engine:
        head = engine.step_many(["s"], seq[:1])
        rest = engine.step_many(["s"] * (len(seq) - 1), seq[1:])
    np.testing.assert_allclose(np.concatenate([head, rest]), ref.run(seq), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "gru", "lstm"])
@pytest.mark.parametrize(("num_layers", "bias"), [(1, True), (2, False)])
def test_wide_batches_equal_whole_sequence_runs(ref_factory, kind, num_layers, bias):
    """Waves of hundreds of streams take the CPU kernels for wide batches (``models.cells``: the fused
    LSTM from ``LSTM_FUSED_MIN_ROWS``, the GRU serving path from ``GRU_SERVING_MIN_ROWS``), narrow ones
    the others: both give the torch module's outputs."""
    streams, steps = 2 * max(GRU_SERVING_MIN_ROWS, LSTM_FUSED_MIN_ROWS), 4
    ref = ref_factory(kind=kind, input_size=5, hidden_size=24, num_layers=num_layers, bias=bias, seed=3)
    rng = np.random.default_rng(3)
    seqs = [ref.random_inputs(rng, steps) for _ in range(streams)]
    expected = np.stack([ref.run(s) for s in seqs])  # (streams, steps, out)
    events = rng.permutation([s for s in range(streams) for _ in range(steps)])
    cursor = np.zeros(streams, dtype=int)
    got = np.full_like(expected, np.nan)
    with Engine(ref.model, device="cpu") as engine:
        for chunk in np.array_split(events, 5):  # waves from ~streams wide down to a few rows
            ts = []
            for s in chunk:
                ts.append(cursor[s])
                cursor[s] += 1
            outs = engine.step_many(chunk, np.stack([seqs[s][t] for s, t in zip(chunk, ts, strict=True)]))
            got[chunk, ts] = outs
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
