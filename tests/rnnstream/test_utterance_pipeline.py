"""The pipeline with an utterance model (a bidirectional classifier): frames get no output document, each
end gets the torch module's answer on the whole utterance; the ends of one poll run as one batched
``engine.end_many``; an over-long utterance is a dead letter that touches no other stream; a restart
from the local checkpoint resumes half-buffered utterances."""

from __future__ import annotations

import json

import numpy as np
import pytest

from connectors.base import Message
from connectors.codec import Decoder, KeyedDecoder
from engine import Engine
from models import save_bundle
from rnnstream.checkpoint import LocalCheckpoint
from rnnstream.config import ServiceConfig
from rnnstream.pipeline import Pipeline
from rnnstream.service import check
from tests.models.utterance_reference import make_utterance_reference
from tests.rnnstream.test_pipeline import CrashingSink, FullDisk, ListDeadLetters, ListSink, ListSource

F = 3
MAX_FRAMES = 10


def _utterances(rng: np.random.Generator, ref, lengths: list[int]) -> tuple[list[Message], list]:
    """Interleaved messages (one frame each, then ``{"control": "end"}``) of utterances ``lengths``; stream
    ``k % 4`` says ``u{k % 4}``, so a stream ends and starts again. Returns messages and, per utterance,
    ``(stream, frames, end position)`` in the order of ``lengths``."""
    seqs = [ref.random_inputs(rng, n) for n in lengths]
    cursors, queues = [0] * len(seqs), [[k for k in range(len(seqs)) if k % 4 == s] for s in range(4)]
    msgs: list[Message] = []
    utterances: list = [None] * len(seqs)
    while any(queues):
        s = int(rng.choice([q for q in range(4) if queues[q]]))
        k = queues[s][0]
        key = f"u{s}".encode()
        if cursors[k] < len(seqs[k]):
            msgs.append(Message(json.dumps({"x": seqs[k][cursors[k]].tolist()}).encode(), key, 0, len(msgs)))
            cursors[k] += 1
        else:
            utterances[k] = (f"u{s}", seqs[k], len(msgs))
            msgs.append(Message(b'{"control": "end"}', key, 0, len(msgs)))
            queues[s].pop(0)
    return msgs, utterances


def _pipeline(ref, source, tmp_path) -> tuple[Pipeline, ListSink, ListDeadLetters]:
    sink, dead = ListSink(), ListDeadLetters()
    engine = Engine(ref.model, device="cpu", freeze_gc=False)
    decoder = KeyedDecoder(Decoder("json", F))
    pipe = Pipeline(engine, source, decoder, sink, dead, LocalCheckpoint(tmp_path), checkpoint_interval_s=0.0)
    return pipe, sink, dead


def test_only_ends_are_answered_each_with_the_torch_module_on_its_utterance(tmp_path):
    ref = make_utterance_reference("lstm", 2, bidirectional=True, input_size=F, max_frames=MAX_FRAMES)
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, MAX_FRAMES + 1, 24)]
    lengths[5] = lengths[23] = MAX_FRAMES + 3  # past the bound: refused, no other stream touched
    msgs, utterances = _utterances(rng, ref, lengths)
    pipe, sink, dead = _pipeline(ref, ListSource(msgs, batch=16), tmp_path)
    batch_sizes = []
    end_many = pipe.engine.end_many
    pipe.engine.end_many = lambda ids: batch_sizes.append(len(ids)) or end_many(ids)  # type: ignore[method-assign]
    pipe.run()
    refused = {u[2] for k, u in enumerate(utterances) if lengths[k] > MAX_FRAMES}
    assert sorted(d.position for d in dead.outputs) == sorted(refused)
    assert all("passes the bound of 10 (utterance_frames)" in d.reason for d in dead.outputs)
    answers = {o.position: o for o in sink.outputs}
    assert sorted(answers) == sorted(u[2] for u in utterances if u[2] not in refused)  # ends only
    for sid, seq, position in utterances:
        if position not in refused:
            assert answers[position].stream_id == sid and answers[position].doc["control"] == "end"
            np.testing.assert_allclose(answers[position].doc["y"][0], ref.run(seq), atol=1e-5, rtol=1e-5)
    assert max(batch_sizes) > 1 and sum(batch_sizes) == len(utterances)  # ends of a poll run together
    assert pipe.engine.stats().refused_ends == 2
    assert LocalCheckpoint(tmp_path).read([0]).get(0, {}) == {}  # every stream ended, refused ones too


def test_a_restart_resumes_half_buffered_utterances_from_the_local_checkpoint(tmp_path):
    ref = make_utterance_reference("gru", 1, bidirectional=True, input_size=F, max_frames=MAX_FRAMES)
    rng = np.random.default_rng(1)
    msgs, utterances = _utterances(rng, ref, [int(n) for n in rng.integers(4, MAX_FRAMES + 1, 16)])
    first, _, _ = _pipeline(ref, ListSource(msgs, batch=5), tmp_path)
    first.sink = sink1 = CrashingSink(at=6)  # dies at its 7th end, its utterances half-buffered
    first.interval_s = 0.0
    with pytest.raises(SystemExit):
        first.run()
    resumed = LocalCheckpoint(tmp_path).positions()["next"]
    assert 0 < resumed < len(msgs)
    second, sink2, dead = _pipeline(ref, ListSource(msgs, batch=5), tmp_path)
    second.run()
    assert not dead.outputs
    last = {o.position: o for o in sink1.outputs + sink2.outputs}
    assert sorted(last) == sorted(u[2] for u in utterances)
    for _sid, seq, position in utterances:
        np.testing.assert_allclose(last[position].doc["y"][0], ref.run(seq), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fail", [2, 3, 5, 8])
def test_a_failed_checkpoint_replays_onto_the_committed_buffers(tmp_path, fail):
    """A checkpoint that fails rolls back to the last committed one: streams begun since (their frames
    buffered, not yet committed) start again from nothing, so replaying their frames adds none twice."""
    ref = make_utterance_reference("gru", 1, bidirectional=True, input_size=F, max_frames=MAX_FRAMES)
    rng = np.random.default_rng(fail)
    msgs, utterances = _utterances(rng, ref, [int(n) for n in rng.integers(2, MAX_FRAMES + 1, 16)])
    pipe, sink, dead = _pipeline(ref, ListSource(msgs, batch=6), tmp_path)
    pipe.backend = FullDisk(tmp_path, fail=fail)
    pipe.run()
    assert pipe.counters.aborts == 1 and not dead.outputs
    last = {o.position: o for o in sink.outputs}  # answers after the rollback replace earlier ones
    assert sorted(last) == sorted(u[2] for u in utterances)
    for _sid, seq, position in utterances:
        np.testing.assert_allclose(last[position].doc["y"][0], ref.run(seq), atol=1e-5, rtol=1e-5)


def _config(bundle, scoring: str) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "model": str(bundle),
            "source": {"type": "kafka", "topics": ["frames"], "group_id": "g"},
            "sink": {"type": "stdout"},
            "kafka": {"bootstrap_servers": "localhost:9092"},
            "scoring": {"kind": scoring},
        }
    )


def test_the_service_checks_an_utterance_bundle_and_refuses_per_step_scorings(tmp_path):
    ref = make_utterance_reference("lstm", 2, bidirectional=True, input_size=F, max_frames=MAX_FRAMES)
    bundle = save_bundle(ref.model, tmp_path / "u.safetensors")
    assert "bidirectional lstm x2 over whole utterances (<= 10 frames)" in check(_config(bundle, "raw"))
    with pytest.raises(ValueError, match="an utterance model has one per end"):
        check(_config(bundle, "forecast"))


class LosingSource(ListSource):
    """Loses its partition inside its ``lose_at``-th poll and gets it back (a session that expired while
    the process stalled, then a rejoin), as a Kafka consumer's callbacks would."""

    def __init__(self, messages: list[Message], batch: int, lose_at: int) -> None:
        super().__init__(messages, batch)
        self.polls, self.lose_at = 0, lose_at

    def open(self, assignment, resume) -> None:
        self.assignment = assignment
        super().open(assignment, resume)

    def poll(self, timeout_s: float) -> list[Message]:
        self.polls += 1
        if self.polls == self.lose_at:
            self.assignment.lost([0])
            self.assignment.assigned([0])
            return []
        return super().poll(timeout_s)


@pytest.mark.parametrize("lose_at", [3, 4, 6, 9])
def test_a_lost_partition_replays_onto_the_committed_buffers(tmp_path, lose_at):
    """Streams begun since the last checkpoint are forgotten with the partition: replaying their frames
    after it comes back buffers none twice."""
    ref = make_utterance_reference("gru", 1, bidirectional=True, input_size=F, max_frames=MAX_FRAMES)
    rng = np.random.default_rng(lose_at)
    msgs, utterances = _utterances(rng, ref, [int(n) for n in rng.integers(2, MAX_FRAMES + 1, 16)])
    pipe, sink, dead = _pipeline(ref, LosingSource(msgs, 6, lose_at), tmp_path)
    pipe.interval_s = 1e9  # no checkpoint but the last: everything since the start is lost and replayed
    pipe.run()
    assert pipe.counters.aborts == 1 and not dead.outputs
    last = {o.position: o for o in sink.outputs}
    assert sorted(last) == sorted(u[2] for u in utterances)
    for _sid, seq, position in utterances:
        np.testing.assert_allclose(last[position].doc["y"][0], ref.run(seq), atol=1e-5, rtol=1e-5)
