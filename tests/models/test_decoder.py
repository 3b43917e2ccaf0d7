"""Encoder-decoder models: the streamed encoder (interleaved streams through the engine) + ``decode`` equal
the offline reference (``Seq2SeqReference``: the torch modules over the whole sequence, then the greedy
decoder loop), for GRU/LSTM decoders, with and without bridge, regression and classification."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from engine import Engine, UnknownStreamError
from models import load_bundle, save_bundle
from models.decoder import MAX_DECODE_LEN, Seq2SeqReference, seq2seq_from_torch

ATOL = RTOL = 1e-5
TORCH = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def make_seq2seq(
    encoder: str = "lstm",
    decoder: str = "gru",
    layers: int = 1,
    hidden: int = 6,
    features: int = 3,
    bridge: str | None = None,
    task: str = "regression",
    tokens: int = 5,
    end_token: int | None = None,
    encoder_ids: int = 0,
    max_len: int = 6,
    seed: int = 0,
):
    """Random trained-looking torch modules, their ``Seq2SeqReference`` and the imported ``StreamModel``."""
    torch.manual_seed(seed)
    enc = TORCH[encoder](features, hidden, layers).eval()
    embedding = nn.Embedding(encoder_ids, features) if encoder_ids else None
    dec_layers = layers if bridge is None else max(1, 3 - layers)
    dec_hidden = hidden if bridge is None else hidden + 2
    classify = task == "classification"
    dec_in = 4 if classify else features
    dec = TORCH[decoder](dec_in, dec_hidden, dec_layers).eval()
    head = nn.Linear(dec_hidden, tokens if classify else features)
    bridge_linear = nn.Linear(hidden, dec_layers * dec_hidden) if bridge else None
    dec_embedding = nn.Embedding(tokens, dec_in) if classify else None
    start_input = None if classify else torch.randn(features)
    kwargs = dict(
        bridge=bridge_linear,
        bridge_activation="tanh" if bridge == "tanh" else "none",
        embedding=embedding,
        decoder_embedding=dec_embedding,
        start_input=start_input,
        start_token=1 if classify else 0,
        end_token=end_token if classify else None,
    )
    reference = Seq2SeqReference(enc, dec, head, **kwargs).eval()
    model = seq2seq_from_torch(enc, dec, head, max_len=max_len, **kwargs)
    return reference, model


def expected_decode(reference: Seq2SeqReference, seq: np.ndarray, max_len: int) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.as_tensor(seq), max_len).numpy()


def random_inputs(model, rng: np.random.Generator, length: int) -> np.ndarray:
    if model.categorical:
        return rng.integers(0, model.spec.num_embeddings, size=length)
    return rng.standard_normal((length, model.feature_size)).astype(np.float32)


def assert_decoded_equal(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    if expected.dtype == np.int64:
        np.testing.assert_array_equal(got, expected, err_msg=what, strict=True)  # strict: same length
    else:
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=what, strict=True)


@st.composite
def scenarios(draw):
    task = draw(st.sampled_from(["regression", "classification"]))
    cfg = dict(
        encoder=draw(st.sampled_from(["rnn", "gru", "lstm"])),
        decoder=draw(st.sampled_from(["gru", "lstm"])),
        layers=draw(st.integers(1, 2)),
        hidden=draw(st.integers(1, 8)),
        features=draw(st.integers(1, 4)),
        bridge=draw(st.sampled_from([None, "linear", "tanh"])),
        task=task,
        end_token=draw(st.sampled_from([None, 0, 2])),
        encoder_ids=draw(st.sampled_from([0, 0, 6])),
        max_len=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**16)),
    )
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=6))
    order = draw(st.permutations([s for s, n in enumerate(lengths) for _ in range(n)]))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=4)))
    ask = draw(st.sampled_from([None, 1, 3]))  # max_len asked (None: the model's)
    return cfg, lengths, order, cuts, ask


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_streamed_encoder_and_decode_equal_the_offline_seq2seq_reference(scenario):
    """After each chunk of interleaved events (``step_many`` or ``submit``), ``decode_many`` over the
    streams seen so far equals the reference run on each stream's history."""
    cfg, lengths, order, cuts, ask = scenario
    reference, model = make_seq2seq(**cfg)
    rng = np.random.default_rng(cfg["seed"])
    seqs = [random_inputs(model, rng, n) for n in lengths]
    cursor = [0] * len(lengths)
    length = ask or cfg["max_len"]
    with Engine(model, device="cpu", max_batch=3, capacity=2, page_rows=2) as engine:
        for k, (lo, hi) in enumerate(itertools.pairwise([0, *cuts, len(order)])):
            chunk = order[lo:hi]
            if not chunk:
                continue
            xs = np.stack([seqs[s][cursor[s] + chunk[:i].count(s)] for i, s in enumerate(chunk)])
            ids = [f"s{s}" for s in chunk]
            if k % 2:
                engine.step_many(ids, xs)
            else:
                [engine.submit(i, x) for i, x in zip(ids, xs, strict=True)]  # decode orders after them
            for s in chunk:
                cursor[s] += 1
            seen = [s for s in range(len(lengths)) if cursor[s]]
            got = engine.decode_many([f"s{s}" for s in seen], ask)
            for out, s in zip(got, seen, strict=True):
                expected = expected_decode(reference, seqs[s][: cursor[s]], length)
                assert_decoded_equal(out, expected, f"stream {s} after {cursor[s]} events")


def test_classification_stops_after_the_end_token_of_each_stream():
    """Seed 45 decodes 3 tokens then the end token (2) for these inputs: each stream's tokens stop there
    (the end token excluded), the batch of three decoded together."""
    reference, model = make_seq2seq(
        "lstm", "gru", bridge="linear", task="classification", end_token=2, seed=45
    )
    seqs = [np.random.default_rng(s).standard_normal((5, 3)).astype(np.float32) for s in range(3)]
    expected = [expected_decode(reference, seq, 8) for seq in seqs]
    assert [len(e) for e in expected] == [3, 3, 3]  # the case this test is about: an end before max_len
    with Engine(model, device="cpu") as engine:
        for t in range(5):
            engine.step_many(["x", "y", "z"], np.stack([seq[t] for seq in seqs]))
        for got, want in zip(engine.decode_many(["x", "y", "z"], 8), expected, strict=True):
            assert_decoded_equal(got, want, "classification")


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_decode_leaves_the_state_untouched_and_bundles_round_trip(tmp_path, task):
    """A decode between events changes nothing (the next output is the undecoded engine's); the bundle
    carries the decoder (spec + ``decoder.`` weights): the loaded model decodes the same."""
    reference, model = make_seq2seq("gru", "lstm", layers=2, bridge="tanh", task=task, end_token=3, seed=5)
    loaded = load_bundle(save_bundle(model, tmp_path / "seq2seq.safetensors"))
    assert loaded.spec.decoder == model.spec.decoder
    assert any(k.startswith("decoder.") for k in loaded.state_dict())
    xs = np.random.default_rng(3).standard_normal((5, 3)).astype(np.float32)
    with Engine(model, device="cpu") as plain:
        expected_steps = plain.step_many(["a"] * 5, xs)
    with Engine(loaded, device="cpu") as engine:
        engine.step_many(["a"] * 4, xs[:4])
        events = engine.stats().events
        decoded = engine.decode("a")
        assert engine.stats().events == events
        assert_decoded_equal(decoded, expected_decode(reference, xs[:4], 6), "loaded bundle")
        np.testing.assert_allclose(engine.step_many(["a"], xs[4:]), expected_steps[4:], atol=ATOL, rtol=RTOL)


def test_decode_refuses_unknown_streams_bad_lengths_and_models_without_decoder(ref_factory):
    _, model = make_seq2seq()
    with Engine(model, device="cpu") as engine:
        engine.step_many(["a"], np.zeros((1, 3), np.float32))
        with pytest.raises(UnknownStreamError):
            engine.decode_many(["a", "nobody"])
        for bad in (0, -2, MAX_DECODE_LEN + 1, 2.5, True):
            with pytest.raises(ValueError, match="max_len"):
                engine.decode("a", bad)
        assert engine.decode("a", 2).shape == (2, 3) and engine.decode_many([]) == []
    with Engine(ref_factory("gru").model, device="cpu") as engine, pytest.raises(ValueError, match="decoder"):
        engine.decode("a")


def test_a_decoder_without_bridge_must_match_the_encoder_layers():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="bridge"):
        seq2seq_from_torch(nn.GRU(3, 6, 2), nn.GRU(3, 6, 1), nn.Linear(6, 3))
