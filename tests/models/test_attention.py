"""Attention over past states (``models.attention``): streamed through the engine, any interleaving of
streams gives what the offline reference ``AttentiveRecurrent`` computes over each whole sequence, for
every attention kind and cell kind, on the per-event path (``step``) and the one-stream sequence path
(``steps``); also the end output, TBPTT fine-tuning and bundles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from engine import Engine, RefusedEndError
from models import from_torch, load_bundle, save_bundle
from models.attention import AttentiveRecurrent
from models.cells import GRU_SERVING_MIN_ROWS, LSTM_FUSED_MIN_ROWS
from models.tbptt import TBPTT

ATOL = RTOL = 1e-5
KINDS = ("dot", "general", "additive")
CELLS = {"rnn_tanh": nn.RNN, "rnn_relu": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def make_reference(
    cell: str = "gru",
    kind: str = "dot",
    window: int = 4,
    input_size: int = 3,
    hidden_size: int = 6,
    num_layers: int = 1,
    proj_size: int = 0,
    batch_first: bool = False,
    out_features: int = 2,
    attention_size: int = 5,
    seed: int = 0,
) -> AttentiveRecurrent:
    """A random ``AttentiveRecurrent`` in eval mode."""
    torch.manual_seed(seed)
    kwargs: dict = {"num_layers": num_layers, "batch_first": batch_first}
    if cell.startswith("rnn"):
        kwargs["nonlinearity"] = cell.split("_")[1]
    if proj_size:
        kwargs["proj_size"] = proj_size
    rnn = CELLS[cell](input_size, hidden_size, **kwargs)
    return AttentiveRecurrent(rnn, kind, window, out_features, attention_size=attention_size).eval()


def run_reference(ref: AttentiveRecurrent, seq: np.ndarray) -> np.ndarray:
    """One stream's whole sequence ``(T, F)`` through the reference → ``(T, out)``."""
    with torch.no_grad():
        return ref(torch.as_tensor(seq).unsqueeze(1))[:, 0].numpy()


@st.composite
def scenarios(draw):
    cfg = dict(
        cell=draw(st.sampled_from(sorted(CELLS))),
        kind=draw(st.sampled_from(KINDS)),
        window=draw(st.integers(1, 12)),  # smaller and larger than the sequences
        input_size=draw(st.integers(1, 5)),
        hidden_size=draw(st.integers(2, 8)),
        num_layers=draw(st.integers(1, 2)),
        batch_first=draw(st.booleans()),
        attention_size=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 2**16)),
    )
    if cfg["cell"] == "lstm" and draw(st.booleans()):
        cfg["proj_size"] = draw(st.integers(1, cfg["hidden_size"] - 1))
    lengths = draw(st.lists(st.integers(1, 15), min_size=1, max_size=6))
    order = draw(st.permutations([s for s, n in enumerate(lengths) for _ in range(n)]))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=5)))
    modes = draw(
        st.lists(st.sampled_from(["submit", "step_many"]), min_size=len(cuts) + 1, max_size=len(cuts) + 1)
    )
    page_rows = draw(st.sampled_from([2, 16_384]))  # 2: streams spread over pages of the state store
    return cfg, lengths, order, cuts, modes, page_rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_interleaved_streams_equal_the_reference_over_whole_sequences(scenario):
    cfg, lengths, order, cuts, modes, page_rows = scenario
    ref = make_reference(**cfg)
    rng = np.random.default_rng(cfg["seed"])
    seqs = [rng.standard_normal((n, cfg["input_size"])).astype(np.float32) for n in lengths]
    expected = [run_reference(ref, s) for s in seqs]
    cursor = [0] * len(lengths)
    events = []
    for s in order:
        events.append((s, cursor[s]))
        cursor[s] += 1
    got = [np.full_like(e, np.nan) for e in expected]
    with Engine(from_torch(ref), device="cpu", max_batch=5, capacity=2, page_rows=page_rows) as engine:
        for (lo, hi), mode in zip(itertools.pairwise([0, *cuts, len(events)]), modes, strict=True):
            chunk = events[lo:hi]
            if not chunk:
                continue
            ids = [f"s{s}" for s, _ in chunk]
            xs = np.stack([seqs[s][t] for s, t in chunk])
            if mode == "step_many":
                outs = engine.step_many(ids, xs)
            else:
                outs = [
                    f.result(timeout=30) for f in [engine.submit(i, x) for i, x in zip(ids, xs, strict=True)]
                ]
            for (s, t), out in zip(chunk, outs, strict=True):
                got[s][t] = out
        ends = engine.end_many([f"s{s}" for s in range(len(lengths))])
    for s in range(len(lengths)):
        np.testing.assert_allclose(got[s], expected[s], atol=ATOL, rtol=RTOL, err_msg=f"stream {s}")
        np.testing.assert_allclose(ends[s], expected[s][-1], atol=ATOL, rtol=RTOL, err_msg=f"end of {s}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.lists(st.integers(1, 20), min_size=1, max_size=4))
def test_one_stream_s_events_in_one_call_take_the_sequence_path(scenario, pieces):
    """Runs of one stream's events (``StreamModel.steps``: every window at once, the ring carried from
    one call to the next) give the reference's outputs, the ring filling and wrapping part-way."""
    cfg, *_ = scenario
    ref = make_reference(**cfg)
    seq = np.random.default_rng(cfg["seed"]).standard_normal((sum(pieces), cfg["input_size"]))
    seq = seq.astype(np.float32)
    bounds = np.cumsum([0, *pieces])
    with Engine(from_torch(ref), device="cpu") as engine:
        got = [engine.step_many(["s"] * (b - a), seq[a:b]) for a, b in itertools.pairwise(bounds)]
        end = engine.end("s")
    expected = run_reference(ref, seq)
    np.testing.assert_allclose(np.concatenate(got), expected, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(end, expected[-1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("kind", KINDS)
def test_wide_batches_equal_the_reference(cell, kind):
    """Waves of hundreds of streams (the wide-batch GRU/LSTM kernels, one ring write and one masked
    softmax for all of them) give the reference's outputs."""
    streams, steps = 2 * max(GRU_SERVING_MIN_ROWS, LSTM_FUSED_MIN_ROWS), 5
    ref = make_reference(cell, kind, window=3, hidden_size=16, seed=4)
    rng = np.random.default_rng(4)
    seqs = rng.standard_normal((streams, steps, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.as_tensor(seqs).transpose(0, 1)).transpose(0, 1).numpy()  # (streams, steps, out)
    events = rng.permutation([s for s in range(streams) for _ in range(steps)])
    cursor = np.zeros(streams, dtype=int)
    ts = []
    for s in events:
        ts.append(cursor[s])
        cursor[s] += 1
    with Engine(from_torch(ref), device="cpu") as engine:
        got = engine.step_many(events.astype(np.int64), seqs[events, ts])
    np.testing.assert_allclose(got, expected[events, ts], atol=ATOL, rtol=RTOL)


def test_an_end_before_any_event_is_refused_without_touching_other_streams():
    ref = make_reference("gru", "general")
    seq = np.random.default_rng(1).standard_normal((3, 3)).astype(np.float32)
    with Engine(from_torch(ref), device="cpu") as engine:
        engine.start("empty")
        engine.step_many(["full"] * 3, seq)
        empty, full = engine.end_many(["empty", "full"])
        assert engine.stats().refused_ends == 1
    assert isinstance(empty, RefusedEndError) and "no state to attend over" in str(empty)
    np.testing.assert_allclose(full, run_reference(ref, seq)[-1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", KINDS)
def test_one_tbptt_update_trains_the_attention_and_changes_the_output(kind):
    """``forward`` is differentiable through the ring: a TBPTT update reaches the attention's and the
    head's parameters and changes the streamed output."""
    model = from_torch(make_reference("lstm", kind, window=3, seed=2)).train()
    xs = torch.randn(6, 4, 3)
    before, _ = model(xs)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    tbptt = TBPTT(k1=2, k2=6)
    tbptt.step(model, optimiser, model.initial_state(4), xs, torch.zeros(2, 4, 2), nn.functional.mse_loss)
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("attention.")}
    assert kind == "dot" or (grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()))
    after, _ = model(xs)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("kind", KINDS)
def test_bundle_round_trip_keeps_the_outputs(tmp_path, kind):
    model = from_torch(make_reference("gru", kind, window=5, seed=3))
    loaded = load_bundle(save_bundle(model, tmp_path / "attention.safetensors"))
    assert loaded.spec == model.spec
    xs = torch.randn(9, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xs)[0], model(xs)[0], atol=0, rtol=0)


def test_from_torch_takes_the_parts_or_the_reference_module():
    ref = make_reference("lstm", "additive", window=6, proj_size=2, seed=5)
    parts = from_torch(ref.rnn, ref.head, attention=ref.attention)
    whole = from_torch(ref)
    assert parts.spec == whole.spec
    assert (whole.spec.attention, whole.spec.attention_window, whole.spec.attention_size) == (
        "additive",
        6,
        5,
    )
    assert whole.extra_states() == [("attention_states", 6 * 2), ("attention_fill", 2)]
    with pytest.raises(ValueError, match="own head"):
        from_torch(ref, ref.head)


def test_bad_attention_settings_are_refused():
    with pytest.raises(ValueError, match="attention_size"):
        AttentiveRecurrent(nn.GRU(2, 4), "additive", 3, 1)
    with pytest.raises(ValueError, match="unknown attention kind"):
        AttentiveRecurrent(nn.GRU(2, 4), "cosine", 3, 1)
    with pytest.raises(ValueError, match="window"):
        AttentiveRecurrent(nn.GRU(2, 4), "dot", 0, 1)
    with pytest.raises(ValueError, match="unidirectional"):
        AttentiveRecurrent(nn.GRU(2, 4, bidirectional=True), "dot", 3, 1)


@pytest.mark.slow
def test_online_finetuning_trains_and_publishes_an_attention_model(tmp_path):
    """The engine's fine-tuning (recorded states with their rings, TBPTT in the tuner, weight swaps)
    runs on an attention model: versions are published and the served attention weights change."""
    from benchmarks.finetune_bench import sine_rows
    from engine.finetune import FineTuneSettings

    model = from_torch(
        make_reference("gru", "general", window=4, input_size=1, hidden_size=8, out_features=1)
    )
    before = model.attention.weight.detach().clone()
    settings = FineTuneSettings(
        k1=8, k2=24, lr=3e-3, batch_size=32, updates_per_round=5, probation_chunks=16, schedule="inline",
        isolation="thread", min_new_chunks=16, versions_dir=str(tmp_path), seed=3,
    )  # fmt: skip
    phases, ids = np.linspace(0, 6, 16), [f"s{k}" for k in range(16)]
    with Engine(model, device="cpu", max_delay_ms=0) as engine:
        engine.start_finetuning(settings)
        for t in range(120):
            engine.step_many(ids, sine_rows(t, phases, 7))
        stats = engine.finetuner.stats()
        served = engine.model.attention.weight.detach().clone()
    assert stats.published >= 1 and stats.skipped_updates == 0 and not stats.last_error, stats
    assert not torch.equal(served, before)
