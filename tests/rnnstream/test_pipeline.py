"""The pipeline's logic with in-memory parts: ordering and equivalence, the dead-letter path for any
exception, checkpoints and restarts, the state row codec. (The real connectors are tested against real
services in tests/connectors and tests/rnnstream/test_run.py.)"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import DeadLetter, Message, Output
from connectors.codec import Decoder, KeyedDecoder
from engine import Engine
from engine.snapshot import StateLayout
from rnnstream.checkpoint import LocalCheckpoint
from rnnstream.pipeline import Pipeline, StateCodec
from rnnstream.stream_table import StreamTable

F = 3


class ListSource:
    """A replayable in-memory source: ``messages`` in order, ``batch`` per poll, positions = count."""

    guarantee = "replayable"

    def __init__(self, messages: list[Message], batch: int = 7) -> None:
        self.messages = messages
        self.batch = batch
        self.next = 0
        self.committed = 0

    def open(self, assignment, resume: Mapping[str, Any]) -> None:
        self.next = self.committed = int(resume.get("next", 0))
        assignment.assigned([0])

    def poll(self, timeout_s: float) -> list[Message]:
        out = self.messages[self.next : self.next + self.batch]
        self.next += len(out)
        return out

    @property
    def exhausted(self) -> bool:
        return self.next >= len(self.messages)

    def positions(self) -> dict[str, Any]:
        return {"next": self.next}

    def commit(self) -> None:
        self.committed = self.next

    def rollback(self) -> list[int]:
        self.next = self.committed
        return [0]

    def close(self) -> None:
        pass


class ListSink:
    def __init__(self) -> None:
        self.outputs: list[Output] = []

    def write(self, outputs: list[Output]) -> None:
        self.outputs.extend(outputs)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ListDeadLetters(ListSink):
    def write(self, letter: DeadLetter) -> None:  # type: ignore[override]
        self.outputs.append(letter)  # type: ignore[arg-type]


def _messages(rng: np.random.Generator, streams: int, n: int) -> tuple[list[Message], list[tuple[str, Any]]]:
    ids = rng.integers(0, streams, n)
    xs = rng.standard_normal((n, F)).astype(np.float32)
    msgs = [
        Message(json.dumps({"x": x.tolist()}).encode(), f"s{i}".encode(), 0, k)
        for k, (i, x) in enumerate(zip(ids, xs, strict=True))
    ]
    return msgs, [(f"s{i}", x) for i, x in zip(ids, xs, strict=True)]


def _pipeline(ref, source, backend=None, decoder=None) -> tuple[Pipeline, ListSink, ListDeadLetters]:
    sink, dead = ListSink(), ListDeadLetters()
    decoder = decoder or KeyedDecoder(Decoder("json", F))
    engine = Engine(ref.model, device="cpu", freeze_gc=False)
    assert backend is not None
    return Pipeline(engine, source, decoder, sink, dead, backend, checkpoint_interval_s=0.0), sink, dead


def _offline(ref, events) -> dict[str, np.ndarray]:
    per: dict[str, list] = defaultdict(list)
    for sid, x in events:
        per[sid].append(x)
    return {sid: ref.run(np.stack(xs)) for sid, xs in per.items()}


def _by_stream(outputs: list[Output]) -> dict[str, np.ndarray]:
    per: dict[str, list] = defaultdict(list)
    for o in outputs:
        per[o.stream_id].append(np.asarray(o.doc["y"]))
    return {sid: np.concatenate(ys) for sid, ys in per.items()}


def test_interleaved_streams_equal_the_torch_module_over_each_sequence(ref_factory, tmp_path):
    ref = ref_factory("gru", input_size=F, hidden_size=16, num_layers=2, head_out=2)
    msgs, events = _messages(np.random.default_rng(0), streams=12, n=600)
    pipe, sink, dead = _pipeline(ref, ListSource(msgs), LocalCheckpoint(tmp_path))
    pipe.run()
    assert not dead.outputs and len(sink.outputs) == len(msgs)
    got, want = _by_stream(sink.outputs), _offline(ref, events)
    assert set(got) == set(want)
    for sid in want:
        np.testing.assert_allclose(got[sid], want[sid], atol=1e-5)
    assert [o.position for o in sink.outputs] == list(range(len(msgs)))


class Hostile:
    """A decoder that raises every kind of exception for some payloads."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.errors = [
            KeyError("k"),
            RecursionError("deep"),
            MemoryError(),
            ZeroDivisionError(),
            TypeError("t"),
        ]

    def decode(self, msg: Message):
        if msg.payload == b"boom":
            raise self.errors[msg.position % len(self.errors)]
        return self.inner.decode(msg)


def test_any_exception_in_a_decoder_is_a_dead_letter_and_touches_no_other_stream(ref_factory, tmp_path):
    ref = ref_factory("lstm", input_size=F, hidden_size=8, head_out=2)
    msgs, events = _messages(np.random.default_rng(1), streams=5, n=200)
    hostile = [Message(b"boom", b"s1", 0, 0) for _ in range(10)]
    mixed = []
    for k, m in enumerate(msgs):
        mixed.append(m)
        if k % 20 == 0:
            mixed.append(hostile.pop())
    for k, m in enumerate(mixed):
        m.position = k
    decoder = Hostile(KeyedDecoder(Decoder("json", F)))
    pipe, sink, dead = _pipeline(ref, ListSource(mixed), LocalCheckpoint(tmp_path), decoder)
    pipe.run()
    assert len(dead.outputs) == 10
    reasons = {d.reason.split(" ")[1].strip("(:") for d in dead.outputs}
    assert reasons == {"KeyError", "RecursionError", "MemoryError", "ZeroDivisionError", "TypeError"}
    got, want = _by_stream(sink.outputs), _offline(ref, events)
    for sid in want:
        np.testing.assert_allclose(got[sid], want[sid], atol=1e-5)


class CrashingSink(ListSink):
    """Dies (as a kill -9 would stop the process) when output number ``at`` is written."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def write(self, outputs: list[Output]) -> None:
        if len(self.outputs) + len(outputs) > self.at:
            raise SystemExit("crash")
        super().write(outputs)


def test_a_restart_resumes_from_the_checkpoint_without_loss_or_double_application(ref_factory, tmp_path):
    """The first run dies in the middle of its work; the second resumes from the last checkpoint's state
    and positions. Every position is answered, and the last answer of each equals one offline pass: no
    event was lost or applied twice to a state."""
    ref = ref_factory("lstm", input_size=F, hidden_size=8, head_out=2)
    msgs, events = _messages(np.random.default_rng(2), streams=6, n=300)
    first, sink1, _ = _pipeline(ref, ListSource(msgs), LocalCheckpoint(tmp_path))
    first.sink = sink1 = CrashingSink(at=170)
    first.interval_s = 0.002
    with pytest.raises(SystemExit):
        first.run()
    resumed = LocalCheckpoint(tmp_path).positions()["next"]
    assert 0 < resumed <= 170
    second, sink2, _ = _pipeline(ref, ListSource(msgs), LocalCheckpoint(tmp_path))
    second.run()
    assert sink2.outputs[0].position == resumed
    last = {o.position: o for o in sink1.outputs + sink2.outputs}
    assert sorted(last) == list(range(len(msgs)))
    got, want = _by_stream([last[p] for p in sorted(last)]), _offline(ref, events)
    for sid in want:
        np.testing.assert_allclose(got[sid], want[sid], atol=1e-5)


class FullDisk(LocalCheckpoint):
    """Fails its ``fail``-th save as a full disk would."""

    def __init__(self, directory, fail: int) -> None:
        super().__init__(directory)
        self.saves, self.fail = 0, fail

    def _write(self, tables, positions) -> None:
        self.saves += 1
        if self.saves == self.fail:
            raise OSError(28, "No space left on device")
        super()._write(tables, positions)


def test_a_failed_checkpoint_rolls_back_state_and_positions(ref_factory, tmp_path):
    ref = ref_factory("gru", input_size=F, hidden_size=8, head_out=2)
    msgs, events = _messages(np.random.default_rng(3), streams=4, n=120)
    pipe, sink, _ = _pipeline(ref, ListSource(msgs), FullDisk(tmp_path, fail=5))
    pipe.run()
    assert pipe.counters.aborts == 1
    # outputs after the failed commit were produced twice (at-least-once); the last answer per position
    # comes from state restored at the last good checkpoint, so it equals the offline pass
    last: dict[int, Output] = {}
    for o in sink.outputs:
        last[o.position] = o
    got, want = _by_stream([last[p] for p in sorted(last)]), _offline(ref, events)
    for sid in want:
        np.testing.assert_allclose(got[sid], want[sid], atol=1e-5)


def test_state_codec_round_trips_engine_state_and_tables_and_reads_engine_only_rows():
    table = StreamTable(3, initial=np.array([1.0, 2.0, 3.0]))
    table.load(["a", "b"], np.array([[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]))
    codec = StateCodec(StateLayout("gru", ((2,), (2,))), [table])
    engine_rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    rows = codec.encode(engine_rows, ["a", "b"])
    engine, extra = codec.decode(rows)
    np.testing.assert_array_equal(engine, engine_rows)
    np.testing.assert_array_equal(extra, [[4, 5, 6], [7, 8, 9]])
    engine, extra = codec.decode([engine_rows[0].tobytes()])  # written before the table existed
    np.testing.assert_array_equal(extra, [[1, 2, 3]])
    with pytest.raises(ValueError, match="bytes"):
        codec.decode([b"\x00" * 5])


def test_local_checkpoint_survives_a_reopen(tmp_path):
    cp = LocalCheckpoint(tmp_path)
    cp.write(0, "a", b"\x01" * 8)
    cp.write(0, "b", b"\x02" * 8)
    cp.write(0, "b", None)
    cp.save({"rows": {"f.csv": 3}})
    again = LocalCheckpoint(tmp_path)
    assert again.read([0]) == {0: {"a": b"\x01" * 8}} and again.positions() == {"rows": {"f.csv": 3}}


# ---- hostile input through the whole sensor path ----------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
hostile_payloads = st.one_of(
    st.binary(max_size=60),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "ts": json_values | st.floats(1e9, 2e9),
            "value": json_values | st.floats(allow_nan=True, allow_infinity=True),
            "values": json_values,
            "id": json_values,
        },
    ).map(lambda d: json.dumps(d).encode()),
    st.lists(st.text(max_size=8), max_size=4).map(lambda f: ",".join(f).encode(errors="surrogatepass")),
    st.dictionaries(st.sampled_from(["timestamp", "value", None, "x"]), st.text(max_size=8), max_size=4),
)


def _sensor_pipeline(ref_factory, messages, tmp_path):
    from connectors.readings import ReadingDecoder
    from rnnstream.sensors import ForecastScoring, ReadingGuard

    ref = ref_factory("gru", input_size=1, hidden_size=8, head_out=1)
    sink, dead = ListSink(), ListDeadLetters()
    pipe = Pipeline(
        Engine(ref.model, device="cpu", freeze_gc=False),
        ListSource(messages),
        ReadingDecoder(channels=["value"]),
        sink,
        dead,
        LocalCheckpoint(tmp_path),
        scoring=ForecastScoring(["value"]),
        checks=ReadingGuard(1),
    )
    pipe.run()
    return sink.outputs, dead.outputs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(hostile_payloads, min_size=1, max_size=25), st.randoms(use_true_random=False))
def test_hostile_readings_of_one_stream_change_nothing_for_the_others(
    ref_factory, tmp_path_factory, docs_close, junk, rnd
):
    """Whatever one stream's messages hold, the pipeline keeps running and every other stream's outputs
    are exactly those of a run without them."""
    good = [
        Message(json.dumps({"ts": 1_700_000_000 + t, "value": float(np.sin(t + k))}).encode(), f"ok{k}")
        for t in range(15)
        for k in range(3)
    ]
    hostile = [
        Message(p, "victim" if rnd.random() < 0.8 else None)
        if not isinstance(p, dict)
        else Message(p, "victim")
        for p in junk
    ]
    mixed = list(good)
    for m in hostile:
        mixed.insert(rnd.randrange(len(mixed) + 1), m)
    for k, m in enumerate(mixed):
        m.position = k
    clean_out, _ = _sensor_pipeline(
        ref_factory, [Message(m.payload, m.key) for m in good], tmp_path_factory.mktemp("c")
    )
    mixed_out, letters = _sensor_pipeline(ref_factory, mixed, tmp_path_factory.mktemp("m"))
    others = [o.doc for o in mixed_out if o.stream_id.startswith("ok")]
    docs_close(others, [o.doc for o in clean_out])
    assert len(mixed_out) + sum(not d.reason.startswith("accepted") for d in letters) == len(mixed)


def test_channels_that_appear_or_disappear_are_dead_letters_and_touch_no_other_stream(
    ref_factory, tmp_path, docs_close
):
    from connectors.readings import ReadingDecoder
    from rnnstream.sensors import ForecastScoring, ReadingGuard

    ref = ref_factory("lstm", input_size=2, hidden_size=8, head_out=2)

    def run(messages, where):
        sink, dead = ListSink(), ListDeadLetters()
        Pipeline(
            Engine(ref.model, device="cpu", freeze_gc=False),
            ListSource(messages),
            ReadingDecoder(channels=["temp", "rpm"]),
            sink,
            dead,
            LocalCheckpoint(tmp_path / where),
            scoring=ForecastScoring(["temp", "rpm"]),
            checks=ReadingGuard(2),
        ).run()
        return sink.outputs, dead.outputs

    def reading(sid, t, values):
        return Message(json.dumps({"ts": 1_700_000_000 + t, "values": values}).encode(), sid)

    good = [
        reading(f"m{k}", t, {"temp": 20.0 + t % 5, "rpm": 1000.0 + k}) for t in range(30) for k in range(2)
    ]
    odd = [
        reading("victim", 1, {"temp": 1.0, "rpm": 2.0, "vibration": 0.3}),  # a channel appears
        reading("victim", 2, {"temp": 1.0}),  # a channel disappears
        reading("victim", 3, {"temp": 1.0, "rpm": None}),  # a missing value
    ]
    clean, _ = run(list(good), "clean")
    mixed, letters = run(good[:20] + odd + good[20:], "mixed")
    reasons = [d.reason for d in letters]
    assert len(reasons) == 3, reasons
    assert "unknown channel" in reasons[0] and "vibration" in reasons[0]
    assert "rpm" in reasons[1] and "missing" in reasons[1] and "missing" in reasons[2]
    assert not [o for o in mixed if o.stream_id == "victim"]
    docs_close([o.doc for o in mixed], [o.doc for o in clean])
    assert mixed[0].doc["value"] == {"temp": 20.0, "rpm": 1000.0}


class SlowAckSink(ListSink):
    """A sink whose outputs are acknowledged only when the test says so (``acked``), like an MQTT broker."""

    def __init__(self) -> None:
        super().__init__()
        self.acked = 0

    def mark(self) -> int:
        return len(self.outputs)

    def done(self, mark: int) -> bool:
        return mark <= self.acked

    def flush(self) -> None:
        self.acked = len(self.outputs)


class MarkingDeadLetters(ListDeadLetters):
    def mark(self) -> int:
        return 0

    def done(self, mark: int) -> bool:
        return True


class MarkingSource(ListSource):
    def mark(self) -> int:
        return self.next

    def commit(self, mark: int | None = None) -> None:  # type: ignore[override]
        self.committed = self.next if mark is None else mark


def test_a_checkpoint_that_does_not_wait_saves_nothing_before_its_outputs_are_acknowledged(
    ref_factory, tmp_path
):
    """State and positions are saved, and the source acknowledged, only up to outputs the sink has
    confirmed; meanwhile processing goes on."""
    ref = ref_factory("gru", input_size=F, hidden_size=8, head_out=2)
    msgs, _ = _messages(np.random.default_rng(5), streams=4, n=60)
    source, sink, dead = MarkingSource(msgs, batch=10), SlowAckSink(), MarkingDeadLetters()
    backend = LocalCheckpoint(tmp_path)
    pipe = Pipeline(
        Engine(ref.model, device="cpu", freeze_gc=False),
        source,
        KeyedDecoder(Decoder("json", F)),
        sink,
        dead,
        backend,
    )
    assert pipe._deferred
    source.open(pipe, {})
    pipe._restore_tasks([0])
    pipe._process(source.poll(0))
    pipe.checkpoint(wait=False)  # rows and positions taken at 10 messages; outputs not acknowledged
    pipe._process(source.poll(0))
    pipe.checkpoint(wait=False)  # ... and at 20
    assert backend.positions() == {} and source.committed == 0 and len(pipe._in_flight) == 2
    sink.acked = 10  # the broker acknowledged the first 10 outputs
    pipe._complete(wait=False)
    assert backend.positions() == {"next": 10} and source.committed == 10 and len(pipe._in_flight) == 1
    assert LocalCheckpoint(tmp_path).positions() == {"next": 10}  # on disk too
    pipe._process(source.poll(0))
    pipe.checkpoint()  # waits: flushes and saves everything
    assert backend.positions() == {"next": 30} and source.committed == 30 and not pipe._in_flight
    pipe.engine.close()


class SloppyDecoder:
    """A decoder with a bug: it lets NaN, a wrong width and a huge value through for some payloads."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def decode(self, msg: Message):
        from connectors.codec import Decoded

        bad = {b"nan": [[float("nan")] * F], b"wide": [[0.0] * (F + 1)], b"huge": [[1e300] * F]}
        if msg.payload in bad:
            return Decoded(bad[msg.payload], stream_id=msg.key_text())
        return self.inner.decode(msg)


def test_inputs_a_buggy_decoder_lets_through_are_dead_letters_not_a_failed_batch(ref_factory, tmp_path):
    ref = ref_factory("gru", input_size=F, hidden_size=8, head_out=2)
    msgs, events = _messages(np.random.default_rng(7), streams=4, n=80)
    mixed = msgs[:30] + [Message(p, b"s1") for p in (b"nan", b"wide", b"huge")] + msgs[30:]
    for k, m in enumerate(mixed):
        m.position = k
    pipe, sink, dead = _pipeline(
        ref, ListSource(mixed), LocalCheckpoint(tmp_path), SloppyDecoder(KeyedDecoder(Decoder("json", F)))
    )
    pipe.run()
    assert len(dead.outputs) == 3 and all("cannot take" in d.reason for d in dead.outputs)
    got, want = _by_stream(sink.outputs), _offline(ref, events)
    for sid in want:
        np.testing.assert_allclose(got[sid], want[sid], atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.integers(1, 4), min_size=1, max_size=20),
    width=st.integers(1, 4),
    version=st.integers(0, 10**6),
    topic=st.sampled_from(["in", 'we"ird\\topic', "ünï"]),
    data=st.data(),
)
def test_default_outputs_as_json_are_the_documents_encoded(steps, width, version, topic, data):
    """``RawOutputs.json`` writes, byte for byte, what encoding ``RawOutputs.documents`` writes."""
    from connectors.codec import encode_document
    from rnnstream.pipeline import Batch, RawOutputs

    batch = Batch()
    for k, n in enumerate(steps):
        msg = Message(
            b"", f"s{k % 3}".encode(), data.draw(st.integers(0, 99)), data.draw(st.integers(0, 2**40)), topic
        )
        batch.add(msg, f"s{k % 3}", _Decoded([[0.0] * width] * n))
    values = st.floats(allow_nan=True, allow_infinity=True, width=32)
    ys = np.array(
        data.draw(st.lists(values, min_size=sum(steps) * width, max_size=sum(steps) * width)), np.float32
    )
    ys = ys.reshape(sum(steps), width)
    scoring = RawOutputs()
    want = [encode_document(d) for d in scoring.documents(batch, ys, ys, version)]
    assert scoring.json(batch, ys, version) == want


class _Decoded:
    def __init__(self, xs) -> None:
        self.xs = xs


def test_a_json_sink_gets_the_default_outputs_encoded_and_keyed(ref_factory, tmp_path):
    """A sink that takes JSON (the Kafka sink) gets each message's document as bytes, keyed by the
    message's key, instead of ``Output`` objects: the same outputs as a plain sink."""
    ref = ref_factory("gru", input_size=F, hidden_size=8, head_out=2)
    msgs, _ = _messages(np.random.default_rng(5), streams=5, n=200)

    class JsonListSink(ListSink):
        writes_json = True

        def __init__(self) -> None:
            super().__init__()
            self.pairs: list[tuple[bytes, bytes]] = []

        def write_json(self, pairs: list[tuple[bytes, bytes]]) -> None:
            self.pairs.extend(pairs)

    plain, _, _ = _pipeline(ref, ListSource(msgs), LocalCheckpoint(tmp_path / "a"))
    plain.run()
    engine = Engine(ref.model, device="cpu", freeze_gc=False)
    sink = JsonListSink()
    pipe = Pipeline(engine, ListSource(msgs), KeyedDecoder(Decoder("json", F)), sink, ListDeadLetters(),
                    LocalCheckpoint(tmp_path / "b"), checkpoint_interval_s=0.0)  # fmt: skip
    pipe.run()
    assert not sink.outputs and len(sink.pairs) == len(msgs)
    from connectors.codec import encode_document

    want = [(o.stream_id.encode(), encode_document(o.doc)) for o in plain.sink.outputs]
    got = [(k, json.loads(v)) for k, v in sink.pairs]
    assert [k for k, _ in got] == [k for k, _ in want]
    for (_, g), (_, w) in zip(got, want, strict=True):
        w = json.loads(w)
        assert {k: v for k, v in g.items() if k != "y"} == {k: v for k, v in w.items() if k != "y"}
        np.testing.assert_allclose(g["y"], w["y"], atol=1e-6)
