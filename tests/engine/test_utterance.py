"""Utterance mode through the engine: frames of interleaved streams buffered in their state, the whole
(bidirectional) torch module run at the ends, batched over the streams that end together. Each result
equals the torch module on that whole utterance alone; snapshots and spill carry half-buffered utterances;
an over-long utterance is refused without touching any other stream."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Engine, EngineSnapshot, RefusedEndError
from tests.models.utterance_reference import make_utterance_reference

ATOL = RTOL = 1e-5


@st.composite
def scenarios(draw):
    cfg = dict(
        kind=draw(st.sampled_from(["rnn_tanh", "rnn_relu", "gru", "lstm"])),
        num_layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()),
        num_embeddings=draw(st.sampled_from([0, 0, 7])),
        pooling=draw(st.sampled_from(["last", "last", "mean", "max"])),
        head_out=draw(st.sampled_from([0, 3])),
        input_size=draw(st.integers(1, 5)),
        hidden_size=draw(st.integers(2, 8)),
        batch_first=draw(st.booleans()),
        max_frames=12,
        seed=draw(st.integers(0, 2**16)),
    )
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=7))
    # stream s appears lengths[s] + 1 times: its frames in order, then its end
    order = draw(st.permutations([s for s, n in enumerate(lengths) for _ in range(n + 1)]))
    cuts = sorted(draw(st.sets(st.integers(1, len(order) - 1), max_size=8)))
    return cfg, lengths, order, cuts


def _events(order: list[int], lengths: list[int]) -> list[tuple[str, int]]:
    """``("frame", s)`` for each of stream ``s``'s first ``lengths[s]`` appearances, then ``("end", s)``."""
    seen = [0] * len(lengths)
    events = []
    for s in order:
        events.append(("frame" if seen[s] < lengths[s] else "end", s))
        seen[s] += 1
    return events


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_interleaved_utterances_equal_the_torch_module_on_each_whole_utterance(scenario):
    cfg, lengths, order, cuts = scenario
    ref = make_utterance_reference(**cfg)
    rng = np.random.default_rng(cfg["seed"])
    seqs = [ref.random_inputs(rng, n) for n in lengths]
    expected = [ref.run(s) for s in seqs]
    events = _events(order, lengths)
    cursor = [0] * len(lengths)
    got: dict[int, np.ndarray] = {}
    with Engine(ref.model, device="cpu", max_batch=5, capacity=2) as engine:
        bounds = [0, *cuts, len(events)]
        for lo, hi in itertools.pairwise(bounds):
            chunk = events[lo:hi]
            # frames and ends in runs of one kind: frames through step_many, ends ending together
            for kind, run in itertools.groupby(chunk, key=lambda e: e[0]):
                streams = [s for _, s in run]
                if kind == "end":
                    for s, out in zip(streams, engine.end_many([f"u{s}" for s in streams]), strict=True):
                        got[s] = out
                    continue
                xs = []
                for s in streams:
                    xs.append(seqs[s][cursor[s]])
                    cursor[s] += 1
                ys = engine.step_many([f"u{s}" for s in streams], np.stack(xs))
                assert np.isnan(ys).all()  # per-frame outputs carry nothing
    for s in range(len(lengths)):
        np.testing.assert_allclose(got[s], expected[s], atol=ATOL, rtol=RTOL, err_msg=f"stream {s}")


def test_one_streams_whole_utterance_in_one_call_takes_the_steps_path():
    ref = make_utterance_reference("lstm", num_layers=2, max_frames=20)
    seq = ref.random_inputs(np.random.default_rng(1), 17)
    with Engine(ref.model, device="cpu") as engine:
        assert np.isnan(engine.step_many(["a"] * len(seq), seq)).all()
        got = engine.end("a")
    np.testing.assert_allclose(got, ref.run(seq), atol=ATOL, rtol=RTOL)


def test_an_overlong_utterance_is_refused_and_no_other_stream_is_touched():
    ref = make_utterance_reference("gru", num_layers=2, max_frames=8)
    rng = np.random.default_rng(2)
    long, other = ref.random_inputs(rng, 11), ref.random_inputs(rng, 8)
    with Engine(ref.model, device="cpu") as engine:
        for t in range(11):  # interleaved: the other stream is mid-utterance throughout
            ids = ["long"] + (["other"] if t < 4 else [])
            engine.step_many(ids, np.stack([long[t]] + ([other[t]] if t < 4 else [])))
        (refused,) = engine.end_many(["long"])
        assert isinstance(refused, RefusedEndError)
        assert "utterance of 11+ frames passes the bound of 8 (utterance_frames)" in str(refused)
        assert "long" not in engine and engine.stats().refused_ends == 1
        engine.step_many(["other"] * 4, other[4:])
        got = engine.end("other")
        assert engine.stats().refused_ends == 1
    np.testing.assert_allclose(got, ref.run(other), atol=ATOL, rtol=RTOL)


def test_refused_and_empty_utterances_ending_with_others_leave_their_outputs_alone():
    ref = make_utterance_reference("lstm", bidirectional=True, max_frames=5)
    rng = np.random.default_rng(3)
    good, long = ref.random_inputs(rng, 5), ref.random_inputs(rng, 6)
    with Engine(ref.model, device="cpu") as engine:
        engine.step_many(["good"] * 5 + ["long"] * 6, np.concatenate([good, long]))
        engine.start("empty")
        out_good, out_long, out_empty = engine.end_many(["good", "long", "empty"])
        with pytest.raises(RefusedEndError, match="empty utterance"):
            raise out_empty
        assert isinstance(out_long, RefusedEndError) and engine.stats().refused_ends == 2
    np.testing.assert_allclose(out_good, ref.run(good), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("through_file", [False, True])
def test_a_half_buffered_utterance_survives_snapshot_and_restore(tmp_path, through_file):
    ref = make_utterance_reference("gru", num_layers=2, num_embeddings=9, max_frames=16)
    rng = np.random.default_rng(4)
    seqs = {f"s{i}": ref.random_inputs(rng, n) for i, n in enumerate((10, 16, 3))}
    half = {sid: len(seq) // 2 for sid, seq in seqs.items()}
    with Engine(ref.model, device="cpu") as first:
        for sid, seq in seqs.items():
            first.step_many([sid] * half[sid], seq[: half[sid]])
        snap = first.snapshot()
    if through_file:
        snap = EngineSnapshot.load(snap.save(tmp_path / "snap.safetensors"))
    with Engine(ref.model, device="cpu") as second:
        second.restore(snap)
        for sid, seq in seqs.items():
            second.step_many([sid] * (len(seq) - half[sid]), seq[half[sid] :])
        got = second.end_many(list(seqs))
    for (sid, seq), out in zip(seqs.items(), got, strict=True):
        np.testing.assert_allclose(out, ref.run(seq), atol=ATOL, rtol=RTOL, err_msg=sid)


def test_a_half_buffered_utterance_survives_spill_and_restore(tmp_path):
    ref = make_utterance_reference("lstm", num_layers=1, max_frames=10)
    rng = np.random.default_rng(5)
    seqs = {f"s{i}": ref.random_inputs(rng, n) for i, n in enumerate((9, 4, 10))}
    with Engine(ref.model, device="cpu", ttl_s=0.05, eviction="spill", spill_dir=tmp_path) as engine:
        for sid, seq in seqs.items():
            engine.step_many([sid] * 3, seq[:3])
        time.sleep(0.1)
        assert engine.evict_idle() == 3 and engine.stats().spilled_streams == 3
        for sid, seq in seqs.items():
            engine.step_many([sid] * (len(seq) - 3), seq[3:])
        got = engine.end_many(list(seqs))
    for (sid, seq), out in zip(seqs.items(), got, strict=True):
        np.testing.assert_allclose(out, ref.run(seq), atol=ATOL, rtol=RTOL, err_msg=sid)


def test_fine_tuning_an_utterance_model_is_refused_with_the_reason():
    ref = make_utterance_reference("gru", 1, bidirectional=True, input_size=3, max_frames=8)
    with Engine(ref.model, device="cpu") as engine:
        with pytest.raises(ValueError, match="this model has none"):
            engine.start_finetuning()
        assert engine.finetuner is None
