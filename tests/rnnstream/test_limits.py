"""The per-stream rate limit: the token bucket alone (a fake clock: pure logic), then inside the pipeline
(a flooding stream is refused with a reason and no other stream notices)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from connectors.base import Message
from connectors.codec import Decoder, KeyedDecoder
from engine import Engine
from rnnstream.checkpoint import LocalCheckpoint
from rnnstream.config import LimitsConfig
from rnnstream.limits import StreamRateLimit
from rnnstream.pipeline import Pipeline
from rnnstream.service import _rate_limit
from tests.rnnstream.test_pipeline import (
    F,
    ListDeadLetters,
    ListSink,
    ListSource,
    _by_stream,
    _offline,
    _pipeline,
)


def test_a_bucket_lets_a_burst_through_then_the_sustained_rate():
    limit = StreamRateLimit(rate=10, burst=5)
    assert [limit.allow("a", 1, 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not limit.allow("a", 1, 0.05)  # half a token refilled
    assert limit.allow("a", 1, 0.1)  # one token
    assert limit.allow("b", 5, 0.1)  # another stream has its own bucket
    assert not limit.allow("a", 6, 100.0)  # more than a burst never fits
    assert limit.allow("a", 5, 100.0)
    assert limit.refused == 3


def test_a_refused_message_takes_no_tokens():
    limit = StreamRateLimit(rate=1, burst=4)
    assert limit.allow("a", 3, 0.0)
    assert not limit.allow("a", 2, 0.0)
    assert limit.allow("a", 1, 0.0)


def test_buckets_of_streams_gone_quiet_are_dropped():
    limit = StreamRateLimit(rate=100, burst=100)  # full again 1 s after its last use
    for k in range(1000):
        limit.allow(f"s{k}", 1, 0.0)
    assert len(limit) == 1000
    limit.allow("late", 1, 0.9)
    assert len(limit) == 1001  # no sweep within a second of the last
    limit.allow("later", 1, 1.5)
    assert len(limit) == 2  # the 1000 refilled (1.5 s ago) are gone; "late" (0.6 s ago) is kept


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0.5), (float("nan"), 1)])
def test_settings_that_would_refuse_everything_are_refused(rate, burst):
    with pytest.raises(ValueError):
        StreamRateLimit(rate, burst)


def test_config_builds_the_limit_with_one_second_of_burst_by_default():
    assert _rate_limit(LimitsConfig()) is None
    limit = _rate_limit(LimitsConfig(stream_events_per_s=250))
    assert (limit.rate, limit.burst) == (250, 250)
    limit = _rate_limit(LimitsConfig(stream_events_per_s=0.5, stream_burst=3))
    assert (limit.rate, limit.burst) == (0.5, 3)
    assert _rate_limit(LimitsConfig(stream_events_per_s=0.2)).burst == 1


def test_a_flooding_stream_is_refused_with_a_reason_and_the_others_are_untouched(ref_factory, tmp_path):
    ref = ref_factory("gru", input_size=F, hidden_size=16, num_layers=2, head_out=2)
    rng = np.random.default_rng(7)
    flood = rng.standard_normal((400, F)).astype(np.float32)
    quiet = {f"q{k}": rng.standard_normal((6, F)).astype(np.float32) for k in range(5)}
    messages: list[tuple[str, np.ndarray]] = [("flood", x) for x in flood]
    for k in range(6):  # the quiet streams' events spread through the flood
        messages[60 * k + 3 : 60 * k + 3] = [(sid, xs[k]) for sid, xs in quiet.items()]
    msgs = [
        Message(json.dumps({"x": x.tolist()}).encode(), sid.encode(), 0, k)
        for k, (sid, x) in enumerate(messages)
    ]
    pipe, sink, dead = _pipeline(ref, ListSource(msgs, batch=50), LocalCheckpoint(tmp_path))
    pipe.rate_limit = StreamRateLimit(rate=20, burst=10)
    started = time.monotonic()
    pipe.run()
    elapsed = time.monotonic() - started

    accepted = [o.position for o in sink.outputs if o.stream_id == "flood"]
    assert 10 <= len(accepted) <= 10 + 20 * elapsed + 1
    assert len(dead.outputs) == 400 - len(accepted)
    assert all(d.reason.startswith("rate_limited: stream 'flood'") for d in dead.outputs)
    assert pipe.service_counters()["rejected_rate_limited"] == len(dead.outputs)
    got = _by_stream(sink.outputs)
    want = _offline(ref, [(s, x) for s, xs in quiet.items() for x in xs])
    want["flood"] = _offline(ref, [("flood", messages[p][1]) for p in accepted])["flood"]
    assert set(got) == set(want)
    for sid in want:  # the flood's state saw exactly its accepted events; the others saw all of theirs
        np.testing.assert_allclose(got[sid], want[sid], atol=1e-5)


def _json_messages(events: list[tuple[str, np.ndarray]]) -> list[Message]:
    return [
        Message(json.dumps({"x": x.tolist()}).encode(), s.encode(), 0, k) for k, (s, x) in enumerate(events)
    ]


def test_new_streams_past_the_engines_limits_are_dead_letters_and_the_others_run_exactly(
    ref_factory, tmp_path
):
    ref = ref_factory("lstm", input_size=F, hidden_size=8, head_out=2)
    rng = np.random.default_rng(11)
    events = [(f"s{k % 3}", rng.standard_normal(F).astype(np.float32)) for k in range(30)]
    sink, dead = ListSink(), ListDeadLetters()
    engine = Engine(ref.model, device="cpu", freeze_gc=False, max_streams=2)
    decoder = KeyedDecoder(Decoder("json", F))
    source = ListSource(_json_messages(events), batch=100)  # one poll: no stream can make room
    Pipeline(engine, source, decoder, sink, dead, LocalCheckpoint(tmp_path), checkpoint_interval_s=0.0).run()
    assert len(dead.outputs) == 10
    assert all(d.reason.startswith("capacity: no room for new stream 's2'") for d in dead.outputs)
    got = _by_stream(sink.outputs)
    want = _offline(ref, [(s, x) for s, x in events if s != "s2"])
    assert set(got) == set(want) == {"s0", "s1"}
    for sid in want:
        np.testing.assert_allclose(got[sid], want[sid], atol=1e-5)


class PausingSource(ListSource):
    """``ListSource`` that waits ``pause_s`` before handing out message number ``at``."""

    def __init__(self, messages: list[Message], at: int, pause_s: float) -> None:
        super().__init__(messages, batch=1)
        self.at, self.pause_s = at, pause_s

    def poll(self, timeout_s: float) -> list[Message]:
        if self.next == self.at:
            time.sleep(self.pause_s)
        return super().poll(timeout_s)


def test_streams_the_engine_drops_when_idle_leave_the_checkpoint_and_the_others_stay(ref_factory, tmp_path):
    ref = ref_factory("gru", input_size=F, hidden_size=8, head_out=2)
    rng = np.random.default_rng(12)
    early = [(s, rng.standard_normal(F).astype(np.float32)) for s in ["gone", "kept"] * 3]
    late = [("kept", rng.standard_normal(F).astype(np.float32)) for _ in range(3)]
    msgs = _json_messages(early + late)
    engine = Engine(ref.model, device="cpu", freeze_gc=False, ttl_s=0.15, sweep_interval_s=0.02)
    sink, dead = ListSink(), ListDeadLetters()
    source = PausingSource(msgs, at=len(early), pause_s=0.5)  # "gone" goes quiet, then "kept" too...
    pipe = Pipeline(
        engine,
        source,
        KeyedDecoder(Decoder("json", F)),
        sink,
        dead,
        LocalCheckpoint(tmp_path),
        checkpoint_interval_s=0.0,
    )
    pipe.run()  # ... and comes back: "kept" restarts from the initial state, as in the live engine
    rows = LocalCheckpoint(tmp_path).read([0])[0]
    assert set(rows) == {"kept"}  # "gone"'s checkpointed row was deleted when the engine dropped it
    assert pipe._tasks == {0: {"kept"}}
    got = _by_stream(sink.outputs)
    want = _offline(ref, late)["kept"]
    np.testing.assert_allclose(got["kept"][-3:], want, atol=1e-5)
