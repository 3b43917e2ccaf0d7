"""The replay buffer cuts the right TBPTT chunks: inputs, next-step or feedback targets, the state at each
chunk's start, held-back validation chunks, memory caps, quarantine, and history breaks on reset.

Pure logic: the "state" handed to ``record`` is a tensor that encodes (stream, step), so a chunk's start
state can be checked exactly.
"""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.replay import IGNORE_LABEL, ReplayBuffer


def _feed(buf: ReplayBuffer, streams: dict[str, int], steps: int, rng: np.random.Generator) -> None:
    """Feed ``steps`` events per stream, interleaved at random, in random batches (each stream at most
    once per batch, as a wave). Input of stream ``s`` at step ``t`` is ``[code(s) * 1000 + t]``; the state
    before it is ``[code(s), t]``."""
    done = dict.fromkeys(streams, 0)
    while any(n < steps for n in done.values()):
        live = [s for s, n in done.items() if n < steps]
        batch = [s for s in live if rng.random() < 0.6] or live[:1]
        xs = np.array([[streams[s] * 1000 + done[s]] for s in batch], dtype=np.float32)
        state = torch.tensor([[streams[s], done[s]] for s in batch], dtype=torch.float32)
        buf.record(batch, xs, [state])
        for s in batch:
            done[s] += 1


def _all_chunks(buf: ReplayBuffer):
    return buf.train_chunks() + buf.validation_chunks()


def test_next_step_chunks_tile_each_stream_with_the_right_state_and_targets():
    buf = ReplayBuffer(k1=3, k2=5, feature_shape=(1,), validation_every=4, history_steps=64)
    streams = {"a": 1, "b": 2, "c": 3}
    _feed(buf, streams, steps=40, rng=np.random.default_rng(0))
    chunks = _all_chunks(buf)
    for sid in streams:
        starts = sorted(c.start_step for c in chunks if c.stream_id == sid)
        # a chunk starting at s needs x[s+k2] for its last target: s + 5 <= 39
        assert starts == list(range(0, 35, 3)), (sid, starts)
    for c in chunks:
        code = streams[c.stream_id]
        s = c.start_step
        np.testing.assert_array_equal(c.start_state[0], [code, s])
        np.testing.assert_array_equal(c.xs[:, 0], code * 1000 + np.arange(s, s + 5))
        # outputs of steps s+2..s+4 predict inputs s+3..s+5
        np.testing.assert_array_equal(c.targets[:, 0], code * 1000 + np.arange(s + 3, s + 6))
        assert c.mask.all()
    validation = buf.validation_chunks()
    assert len(validation) == len(chunks) // 4
    assert not {c.seq for c in validation} & {c.seq for c in buf.train_chunks()}, (
        "held-back chunks are never trained on"
    )


def test_batches_stack_time_major():
    buf = ReplayBuffer(k1=2, k2=4, feature_shape=(1,), validation_every=1000)
    _feed(buf, {"a": 1, "b": 2}, steps=30, rng=np.random.default_rng(1))
    batch = buf.sample(5, random.Random(0))
    assert batch is not None
    assert batch.xs.shape == (4, 5, 1) and batch.targets.shape == (2, 5, 1)
    assert batch.mask.shape == (2, 5) and batch.start_state[0].shape == (5, 2)
    assert buf.sample(5, random.Random(0)).seqs == batch.seqs  # seeded sampling is reproducible


def test_caps_evict_oldest_first():
    buf = ReplayBuffer(
        k1=1,
        k2=2,
        feature_shape=(1,),
        validation_every=10**6,
        max_chunks=50,
        max_chunks_per_stream=20,
        max_streams=3,
    )
    _feed(buf, {"a": 1, "b": 2, "c": 3, "d": 4}, steps=60, rng=np.random.default_rng(2))
    assert buf.stats()["tracked_streams"] == 3, "streams beyond max_streams are not tracked"
    assert len(buf) == 50
    per_stream: dict[str, list[int]] = {}
    for c in buf.train_chunks():
        per_stream.setdefault(c.stream_id, []).append(c.start_step)
    for sid, starts in per_stream.items():
        assert len(starts) <= 20
        # what is left of each stream is its newest chunks
        assert max(starts) == 60 - 3, sid
        assert sorted(starts) == list(range(min(starts), 58))


def test_non_finite_or_huge_values_are_quarantined():
    buf = ReplayBuffer(k1=2, k2=4, feature_shape=(1,), validation_every=10**6, max_abs_value=100.0)
    state = [torch.zeros(1, 1)]
    for t in range(20):
        buf.record(["ok"], np.array([[0.5]], np.float32), state)
        buf.record(["huge"], np.array([[1e9 if t == 7 else 0.5]], np.float32), state)
    huge = [c for c in buf.train_chunks() if c.stream_id == "huge"]
    ok = [c for c in buf.train_chunks() if c.stream_id == "ok"]
    assert len(ok) == 8  # starts 0, 2, ..., 14
    assert all(not (c.start_step <= 7 < c.start_step + 5) for c in huge), "chunks touching step 7 dropped"
    assert buf.stats()["quarantined"] == 8 - len(huge) > 0


def test_forget_breaks_history_so_no_chunk_spans_a_reset():
    buf = ReplayBuffer(k1=2, k2=4, feature_shape=(1,), validation_every=10**6)
    state = [torch.zeros(1, 1)]
    for t in range(5):
        buf.record(["a"], np.array([[float(t)]], np.float32), state)
    buf.forget(["a"])
    for t in range(100, 106):
        buf.record(["a"], np.array([[float(t)]], np.float32), state)
    chunks = list(buf.train_chunks())
    assert [c.xs[0, 0] for c in chunks] == [0.0, 100.0], "one chunk before the reset, one after"
    for c in chunks:
        values = np.concatenate([c.xs[:, 0], c.targets[:, 0]])
        assert (values < 5).all() or (values >= 100).all(), "a chunk spans the reset"
    assert buf.steps_of("a") == 6


def test_feedback_labels_cut_masked_chunks_whenever_they_arrive():
    buf = ReplayBuffer(k1=2, k2=4, feature_shape=(1,), target="feedback", validation_every=10**6)
    state = [torch.zeros(1, 1)]

    def step(n: int) -> None:
        for _ in range(n):
            t = buf.steps_of("a")
            buf.record(["a"], np.array([[float(t)]], np.float32), [state[0] + t])

    step(10)
    assert len(buf) == 0, "no labels, no chunks"
    # Late label for steps 4..5: loss windows are [s+2, s+4) for s = 0, 2, 4...; steps 4, 5 → s = 2.
    assert buf.feedback("a", 1, start=4, end=6) == 2
    (chunk,) = buf.train_chunks()
    assert chunk.start_step == 2 and chunk.start_state[0][0] == 2.0
    np.testing.assert_array_equal(chunk.targets, [1, 1])
    # A label for the latest step (9) whose window [8, 10) of s = 6 is complete: cut at once, masked.
    assert buf.feedback("a", 3) == 1
    chunk = list(buf.train_chunks())[-1]
    assert chunk.start_step == 6
    np.testing.assert_array_equal(chunk.targets, [IGNORE_LABEL, 3])
    np.testing.assert_array_equal(chunk.mask, [False, True])
    # A label for step 10, whose window [10, 12) (s = 8) completes only at step 12: cut then.
    step(1)
    assert buf.feedback("a", 5) == 1 and len(buf) == 2
    step(1)
    chunk = list(buf.train_chunks())[-1]
    assert len(buf) == 3 and chunk.start_step == 8
    np.testing.assert_array_equal(chunk.targets, [5, IGNORE_LABEL])
    # Vector labels (regression targets) work the same way.
    buf2 = ReplayBuffer(k1=2, k2=2, feature_shape=(1,), target="feedback", validation_every=10**6)
    for t in range(4):
        buf2.record(["b"], np.array([[float(t)]], np.float32), state)
    assert buf2.feedback("b", [0.5, -0.5], start=0, end=4) == 4
    targets = np.stack([c.targets for c in buf2.train_chunks()])
    np.testing.assert_array_equal(targets, np.tile([0.5, -0.5], (2, 2, 1)))
    assert buf2.feedback("unknown", 1) == 0


def test_ctc_feedback_cuts_a_span_chunk_from_the_newest_state_before_it():
    buf = ReplayBuffer(
        k1=4, k2=8, feature_shape=(1,), target="feedback", validation_every=10**6, sequence_labels=True
    )
    for t in range(30):
        buf.record(["a"], np.array([[float(t)]], np.float32), [torch.tensor([[float(t)]])])
    assert buf.feedback("a", [2, 1, 2], start=10, end=17) == 7
    (chunk,) = buf.train_chunks()
    assert chunk.sequence and chunk.start_step == 8 and chunk.start_state[0][0] == 8.0
    np.testing.assert_array_equal(chunk.xs[:, 0], np.arange(8, 17))
    np.testing.assert_array_equal(chunk.mask, np.arange(8, 17) >= 10)
    np.testing.assert_array_equal(chunk.targets, [2, 1, 2])
    buf.feedback("a", [1], start=20, end=22)
    batch = buf.sample(2, random.Random(0))
    assert batch.target_lengths is not None and sorted(batch.target_lengths.tolist()) == [1, 3]
    assert batch.xs.shape == (9, 2, 1) and batch.targets.shape == (2, 3)
    assert sorted(batch.mask.sum(0).tolist()) == [2, 7]
    with pytest.raises(ValueError, match="span"):
        buf.feedback("a", [1], start=25, end=40)  # the future
    with pytest.raises(ValueError, match="class ids"):
        buf.feedback("a", [0.5], start=20, end=22)


def test_many_streams_grow_the_preallocated_rows_and_keep_every_chunk_exact():
    """600 streams (the row arrays start smaller and grow): every chunk still has its own stream's
    inputs, targets and start state."""
    buf = ReplayBuffer(k1=4, k2=8, feature_shape=(1,), validation_every=3, history_steps=32, max_streams=1000)
    streams = {f"s{i}": i + 1 for i in range(600)}
    _feed(buf, streams, steps=20, rng=np.random.default_rng(5))
    chunks = buf.train_chunks() + buf.validation_chunks()
    assert buf.stats()["tracked_streams"] == 600
    assert len(chunks) == 600 * 3  # starts 0, 4, 8 (a chunk at s needs x[s+8] <= x[19])
    for c in chunks:
        code, s = streams[c.stream_id], c.start_step
        np.testing.assert_array_equal(c.start_state[0], [code, s])
        np.testing.assert_array_equal(c.xs[:, 0], code * 1000 + np.arange(s, s + 8))
        np.testing.assert_array_equal(c.targets[:, 0], code * 1000 + np.arange(s + 5, s + 9))


def test_rows_of_forgotten_streams_are_reused_without_mixing_histories():
    buf = ReplayBuffer(k1=2, k2=4, feature_shape=(1,), validation_every=10**6, max_streams=2)
    state = [torch.zeros(1, 1)]
    for t in range(3):
        buf.record(["a"], np.array([[float(t)]], np.float32), state)
    buf.forget(["a"])
    for t in range(10):  # "b" takes the row "a" had; its chunks hold only its own inputs
        buf.record(["b"], np.array([[100.0 + t]], np.float32), state)
        buf.record(["c"], np.array([[200.0 + t]], np.float32), state)
    assert buf.stats()["tracked_streams"] == 2 and buf.steps_of("a") == 0 and buf.steps_of("b") == 10
    for c in buf.train_chunks():
        base = {"b": 100.0, "c": 200.0}[c.stream_id]
        np.testing.assert_array_equal(c.xs[:, 0], base + np.arange(c.start_step, c.start_step + 4))


def test_a_non_finite_state_quarantines_the_chunks_that_start_from_it():
    buf = ReplayBuffer(k1=2, k2=4, feature_shape=(1,), validation_every=10**6)
    for t in range(20):
        state = torch.full((1, 1), float("nan") if t == 6 else 0.0)
        buf.record(["a"], np.array([[0.5]], np.float32), [state])
    starts = [c.start_step for c in buf.train_chunks()]
    assert 6 not in starts and starts == [0, 8, 10, 12, 14], starts
    assert buf.stats()["quarantined"] == 3  # starts 2 and 4 span step 6, 6 starts from it


def test_another_process_sees_the_chunks_through_the_shared_store():
    """The fine-tuning worker samples in its own process: it maps the buffer's chunk store and reads the
    same chunks, without anything being copied or sent."""
    buf = ReplayBuffer(k1=3, k2=5, feature_shape=(1,), validation_every=4, history_steps=64)
    _feed(buf, {"a": 1, "b": 2}, steps=30, rng=np.random.default_rng(0))
    train, validation = buf.train_chunks(), buf.validation_chunks()  # (cuts the chunks complete by now)
    store = buf.store
    assert store is not None
    script = """
import json, pickle, sys
import numpy as np
from engine.replay import sample_store, validation_from_store
from engine.replay_store import ChunkStore

store = ChunkStore.attach(pickle.loads(bytes.fromhex(sys.argv[1])), int(sys.argv[2]))
train = sample_store(store, 1000, np.random.default_rng(0))
val = validation_from_store(store, 1000)
rows = {seq: train.xs[:, b, 0].tolist() for b, seq in enumerate(train.seqs)}
print(json.dumps({"train": sorted(rows.items()), "validation": val.seqs}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script, pickle.dumps(store.layout).hex(), str(store.fd)],
        pass_fds=(store.fd,),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    seen = json.loads(out)
    assert seen["train"] == [[c.seq, c.xs[:, 0].tolist()] for c in train]
    assert seen["validation"] == [c.seq for c in validation]
