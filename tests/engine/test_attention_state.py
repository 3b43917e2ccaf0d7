"""An attention model's ring buffers (``attention_states``, ``attention_fill``) are stream state like the
layers': a snapshot restored into a fresh engine, a spill and its reload, and the service's checkpoint
rows (``rnnstream.pipeline.StateCodec``) all continue exactly where the uninterrupted run is; a plain
model's state and an attention model's refuse to load into each other."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from engine import Engine
from engine.errors import SnapshotError
from engine.snapshot import EngineSnapshot, StateLayoutError, state_layout
from models import from_torch
from models.attention import AttentiveRecurrent
from rnnstream.pipeline import StateCodec

ATOL = RTOL = 1e-5
WINDOW = 4


def _model(kind: str = "additive", cell: type[nn.RNNBase] = nn.LSTM, seed: int = 0):
    torch.manual_seed(seed)
    return from_torch(AttentiveRecurrent(cell(3, 6), kind, WINDOW, 2, attention_size=4))


def _interleaved(streams: int, length: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Events of ``streams`` streams of ``length`` steps each, shuffled (per-stream order kept)."""
    rng = np.random.default_rng(seed)
    ids = [f"s{s}" for s in rng.permutation(np.repeat(np.arange(streams), length))]
    return ids, rng.standard_normal((len(ids), 3)).astype(np.float32)


@pytest.mark.parametrize("kind", ["dot", "general", "additive"])
def test_snapshot_restored_into_a_fresh_engine_continues_the_run(kind, tmp_path):
    """Cut after 3 steps of each stream (ring not yet full) and after 6 (wrapped): the restored engine's
    outputs and end outputs equal the uninterrupted engine's."""
    model = _model(kind)
    ids, xs = _interleaved(streams=5, length=10)
    streams = sorted(set(ids))
    with Engine(model, device="cpu") as plain:
        expected = plain.step_many(ids, xs)
        expected_ends = plain.end_many(streams)
    for cut in (15, 30):
        with Engine(model, device="cpu") as first:
            head = first.step_many(ids[:cut], xs[:cut])
            path = first.snapshot().save(tmp_path / f"cut{cut}.safetensors")
        with Engine(_model(kind), device="cpu") as second:
            second.restore(EngineSnapshot.load(path))
            tail = second.step_many(ids[cut:], xs[cut:])
            ends = second.end_many(streams)
        np.testing.assert_allclose(np.concatenate([head, tail]), expected, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(np.stack(ends), np.stack(expected_ends), atol=ATOL, rtol=RTOL)


def test_spilled_streams_come_back_with_their_rings(tmp_path):
    model = _model("general", nn.GRU)
    ids, xs = _interleaved(streams=6, length=12, seed=1)
    half = len(ids) // 2
    with Engine(model, device="cpu") as plain:
        expected = plain.step_many(ids, xs)
    with Engine(model, device="cpu", ttl_s=0.05, eviction="spill", spill_dir=tmp_path) as engine:
        first = engine.step_many(ids[:half], xs[:half])
        time.sleep(0.1)
        assert engine.evict_idle() == 6 and engine.stats().spilled_streams == 6
        second = engine.step_many(ids[half:], xs[half:])
    np.testing.assert_allclose(np.concatenate([first, second]), expected, atol=ATOL, rtol=RTOL)


def test_checkpoint_rows_carry_the_rings():
    """The service's checkpoint rows (header with the extras, then the state) decode to the same rows,
    and a restore from them continues the run."""
    model = _model("dot")
    ids, xs = _interleaved(streams=4, length=9, seed=2)
    cut = 20
    with Engine(model, device="cpu") as plain:
        expected = plain.step_many(ids, xs)
    codec = StateCodec(state_layout(model), [])
    with Engine(model, device="cpu") as first:
        first.step_many(ids[:cut], xs[:cut])
        snap = first.snapshot()
    rows = codec.encode(torch.cat(snap.states, dim=1).numpy(), [str(s) for s in snap.stream_ids])
    decoded, _ = codec.decode(rows)
    states = list(torch.split(torch.from_numpy(decoded), model.state_widths(), dim=1))
    restored = EngineSnapshot(snap.stream_ids, states, layout=state_layout(model))
    with Engine(model, device="cpu") as second:
        second.restore(restored)
        tail = second.step_many(ids[cut:], xs[cut:])
    np.testing.assert_allclose(tail, expected[cut:], atol=ATOL, rtol=RTOL)


def test_plain_and_attention_states_refuse_each_other():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 6)
    plain = from_torch(rnn, nn.Linear(6, 2))
    attentive = from_torch(AttentiveRecurrent(rnn, "dot", WINDOW, 2))
    x = np.zeros((1, 3), dtype=np.float32)
    with Engine(plain, device="cpu") as ep, Engine(attentive, device="cpu") as ea:
        ep.step_many(["a"], x)
        ea.step_many(["a"], x)
        with pytest.raises(SnapshotError, match="attention_states"):
            ea.restore(ep.snapshot())
        with pytest.raises(SnapshotError, match="attention_states"):
            ep.restore(ea.snapshot())
    rows = StateCodec(state_layout(plain), []).encode(np.zeros((1, 6), np.float32), ["a"])
    with pytest.raises(StateLayoutError, match="attention_states"):
        StateCodec(state_layout(attentive), []).decode(rows)
    longer_window = from_torch(AttentiveRecurrent(rnn, "dot", WINDOW + 1, 2))
    with pytest.raises(StateLayoutError, match="attention_states"):
        state_layout(attentive).check_loads_into(state_layout(longer_window))
