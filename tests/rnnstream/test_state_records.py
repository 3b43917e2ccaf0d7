"""Versioned state records: every checkpoint row (``StateCodec``: the Kafka changelog's values, the local
checkpoint's rows) starts with the state layout that wrote it; another layout is refused naming both, a
garbage row is refused for its own stream only (logged; the stream starts afresh), and rows written
before the header existed still load (by their length, as they always did)."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.snapshot import StateLayout, StateLayoutError, state_layout
from models import save_bundle
from rnnstream.checkpoint import LocalCheckpoint
from rnnstream.config import load_config
from rnnstream.pipeline import StateCodec
from rnnstream.service import build_pipeline
from rnnstream.stream_table import StreamTable

GRU_2X16 = StateLayout("gru", ((16,), (16,)))


def _codec(layout: StateLayout = GRU_2X16, extra: int = 0) -> StateCodec:
    tables = [StreamTable(extra, initial=np.arange(extra, dtype=np.float64))] if extra else []
    return StateCodec(layout, tables)


def _rows(rng: np.random.Generator, n: int, width: int = 32) -> np.ndarray:
    return rng.standard_normal((n, width)).astype(np.float32)


# ---- the codec --------------------------------------------------------------------------------------------
def test_rows_carry_the_layout_header_and_round_trip():
    codec = _codec(extra=2)
    engine_rows = _rows(np.random.default_rng(0), 3)
    codec.tables[0].load(["a", "b", "c"], np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    rows = codec.encode(engine_rows, ["a", "b", "c"])
    header = GRU_2X16.row_header()
    assert all(r.startswith(header) and len(r) == len(header) + 4 * 32 + 8 * 2 for r in rows)
    assert len(header) == 17  # 9 fixed bytes + one uint32 width per state tensor
    engine, extra = codec.decode(rows)
    np.testing.assert_array_equal(engine, engine_rows)
    np.testing.assert_array_equal(extra, [[1, 2], [3, 4], [5, 6]])


@pytest.mark.parametrize(
    ("reader", "message"),
    [
        (StateLayout("gru", ((32,),)), r"state written by gru 2x16 cannot load into gru 1x32 \(layers: 2 vs"),
        (StateLayout("lstm", ((16, 16),)), r"gru 2x16 cannot load into lstm 1x16 \(cell: gru vs lstm; lay"),
        (StateLayout("rnn_tanh", ((16,), (16,))), r"gru 2x16 cannot load into rnn_tanh 2x16 \(cell: gru vs"),
    ],
)
def test_rows_of_another_layout_are_refused_naming_both_even_at_the_same_width(reader, message):
    rows = _codec().encode(_rows(np.random.default_rng(1), 2), ["a", "b"])
    with pytest.raises(StateLayoutError, match=message):
        _codec(reader).decode(rows)
    with pytest.raises(StateLayoutError, match=message):
        _codec(reader).decode_table(dict(zip(["a", "b"], rows, strict=True)))


def test_rows_of_a_newer_record_version_are_refused():
    row = bytearray(_codec().encode(_rows(np.random.default_rng(2), 1), ["a"])[0])
    row[4] = 99  # the record version byte
    with pytest.raises(StateLayoutError, match="record version 99"):
        _codec().decode([bytes(row)])


def test_rows_written_before_the_header_load_by_their_length():
    """Legacy rows (engine state, optionally the tables' rows) hold no layout: they load when their
    length fits, as before versioning, and are rewritten with the header at the stream's next
    checkpoint."""
    codec = _codec(extra=2)
    engine_rows = _rows(np.random.default_rng(3), 2)
    legacy = [engine_rows[0].tobytes(), engine_rows[1].tobytes() + np.array([7.0, 8.0]).tobytes()]
    engine, extra = codec.decode(legacy)
    np.testing.assert_array_equal(engine, engine_rows)
    np.testing.assert_array_equal(extra, [[0, 1], [7, 8]])


def test_garbage_rows_are_refused_for_their_own_stream_only(caplog):
    codec = _codec()
    engine_rows = _rows(np.random.default_rng(4), 3)
    good = codec.encode(engine_rows, ["a", "b", "c"])
    header = GRU_2X16.row_header()
    garbage = {
        "short": b"\x00" * 5,
        "cut": good[0][:-3],
        "header-only": header,
        "bad-header": header[:4] + b"\x01\x09" + header[6:] + engine_rows[0].tobytes(),  # cell code 9
        "version-0": header[:4] + b"\x00" + header[5:] + engine_rows[0].tobytes(),
        "no-layers": header[:7] + b"\x00\x00" + engine_rows[0].tobytes(),
    }
    with pytest.raises(ValueError):
        codec.decode([garbage["short"]])
    table = {"a": good[0], **garbage, "c": good[2]}
    with caplog.at_level(logging.WARNING, logger="rnnstream.pipeline"):
        ids, engine, extra = codec.decode_table(table)
    assert ids == ["a", "c"]
    np.testing.assert_array_equal(engine, engine_rows[[0, 2]])
    assert extra.shape == (2, 0)
    refusals = [r.getMessage() for r in caplog.records]
    assert len(refusals) == len(garbage)
    assert all(any(f"stream {sid!r}" in m and "starts afresh" in m for m in refusals) for sid in garbage)


# ---- extra state (attention rings, buffered utterances): record version 2 --------------------------------
GRU_ATTN = StateLayout("gru", ((16,),), extras=(("attention_states", 64), ("attention_fill", 2)))


def test_a_layout_with_extra_state_writes_version_2_and_round_trips():
    codec = _codec(GRU_ATTN)
    engine_rows = _rows(np.random.default_rng(5), 3, width=16 + 64 + 2)
    rows = codec.encode(engine_rows, ["a", "b", "c"])
    header = GRU_ATTN.row_header()
    assert header[4] == 2 and len(header) == 9 + 4 + 1 + 5 * 2
    assert StateLayout.from_row(rows[0]) == (GRU_ATTN, len(header))
    np.testing.assert_array_equal(codec.decode(rows)[0], engine_rows)
    assert StateLayout.from_dict(GRU_ATTN.to_dict()) == GRU_ATTN
    assert GRU_ATTN.describe() == "gru 1x16 + attention_states 64 + attention_fill 2"
    assert GRU_2X16.row_header()[4] == 1  # no extras: the version 1 header, byte for byte as before


def test_extras_alone_make_a_layout():
    frames = StateLayout("lstm", (), extras=(("utterance_frames", 40), ("utterance_length", 2)))
    assert StateLayout.from_row(frames.row_header() + b"\0" * 8) == (frames, len(frames.row_header()))


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        (GRU_ATTN, StateLayout("gru", ((16,),), extras=(("attention_states", 32), ("attention_fill", 2)))),
        (GRU_ATTN, StateLayout("gru", ((16,), (16,), (16,), (16,), (16,), (2,)))),
        (StateLayout("gru", ((16,), (16,), (16,), (16,), (16,), (2,))), GRU_ATTN),
    ],
)
def test_extras_are_part_of_the_identity_even_at_the_same_total_width(writer, reader):
    rows = _codec(writer).encode(_rows(np.random.default_rng(6), 1, width=82), ["a"])
    with pytest.raises(StateLayoutError, match="cannot load into"):
        _codec(reader).decode(rows)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_after_a_version_2_header_start_read_or_raise_value_error(tail):
    row = GRU_ATTN.row_header()[:9] + tail
    with contextlib.suppress(ValueError):
        StateLayout.from_row(row)


# ---- through the pipeline: real CSV source, real local checkpoint file ------------------------------------
def _csv(path: Path, streams: int, rows: int, t0: int, seed: int) -> dict[str, np.ndarray]:
    """Readings of ``streams`` streams, ``rows`` each, timestamps from ``t0``; returns them per stream."""
    rng = np.random.default_rng(seed)
    values = {f"s{s}": rng.standard_normal(rows).astype(np.float32) for s in range(streams)}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "sensor", "value"])
        for t in range(rows):
            for sid, v in values.items():
                w.writerow([t0 + t, sid, repr(float(v[t]))])
    return values


def _run(tmp_path: Path, bundle: Path, data: Path, name: str) -> dict[str, np.ndarray]:
    """``rnnstream run`` in process: ``data`` through the model at ``bundle`` into a JSON-lines file, state
    in ``tmp_path/state``; returns the outputs per stream ``(T, out)``."""
    out = tmp_path / f"{name}.jsonl"
    cfg = {
        "model": str(bundle),
        "source": {
            "type": "csv",
            "paths": [str(data)],
            "stream_column": "sensor",
            "timestamp_column": "timestamp",
            "channels": ["value"],
            "speed": None,
        },
        "sink": {"type": "jsonl", "path": str(out)},
        "dead_letters": {"type": "file", "path": str(tmp_path / f"{name}.dlq.jsonl")},
        "checkpoint": {"interval_ms": 50, "dir": str(tmp_path / "state")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    build_pipeline(load_config(path)).run()
    per: dict[str, list] = {}
    for line in out.read_text().splitlines():
        doc = json.loads(line)
        per.setdefault(doc["stream"], []).append(np.asarray(doc["y"], np.float32))
    return {sid: np.concatenate(ys) for sid, ys in per.items()}


def _bundle(ref_factory, tmp_path: Path, kind: str, layers: int, hidden: int) -> tuple[Path, object]:
    ref = ref_factory(kind, input_size=1, hidden_size=hidden, num_layers=layers, seed=layers)
    return save_bundle(ref.model, tmp_path / f"{kind}-{layers}x{hidden}.safetensors"), ref


def test_a_model_of_another_layout_refuses_the_checkpoint_instead_of_reading_it(ref_factory, tmp_path):
    """GRU 2x16 and GRU 1x32 have the same total state width (32 floats): without the header the second
    model read the first one's states as its own."""
    gru_2x16, _ = _bundle(ref_factory, tmp_path, "gru", 2, 16)
    gru_1x32, _ = _bundle(ref_factory, tmp_path, "gru", 1, 32)
    _csv(tmp_path / "a.csv", 3, 5, 0, 0)
    _run(tmp_path, gru_2x16, tmp_path / "a.csv", "first")
    _csv(tmp_path / "b.csv", 3, 5, 100, 1)
    with pytest.raises(StateLayoutError, match=r"state written by gru 2x16 cannot load into gru 1x32"):
        _run(tmp_path, gru_1x32, tmp_path / "b.csv", "second")


def test_a_garbage_row_restarts_its_stream_afresh_and_the_others_continue_exactly(ref_factory, tmp_path):
    bundle, ref = _bundle(ref_factory, tmp_path, "lstm", 2, 8)
    first = _csv(tmp_path / "a.csv", 4, 6, 0, 0)
    _run(tmp_path, bundle, tmp_path / "a.csv", "first")
    cp = LocalCheckpoint(tmp_path / "state")
    cp.write(0, "s1", b"\x13garbage, not a state row")
    cp.save(cp.positions())

    second = _csv(tmp_path / "b.csv", 4, 6, 100, 1)
    got = _run(tmp_path, bundle, tmp_path / "b.csv", "second")
    for sid in first:
        history = second[sid] if sid == "s1" else np.concatenate([first[sid], second[sid]])
        want = ref.run(history[:, None])[-len(second[sid]) :]
        np.testing.assert_allclose(got[sid], want, atol=1e-5, err_msg=sid)


def test_a_checkpoint_written_before_versioning_resumes_exactly(ref_factory, tmp_path):
    """The rows of a checkpoint file written by the code before versioning (no header) load by length."""
    bundle, ref = _bundle(ref_factory, tmp_path, "gru", 2, 6)
    first = _csv(tmp_path / "a.csv", 3, 5, 0, 0)
    _run(tmp_path, bundle, tmp_path / "a.csv", "first")
    cp = LocalCheckpoint(tmp_path / "state")
    header = state_layout(ref.model).row_header()
    rows = cp.read([0])[0]
    assert rows and all(r.startswith(header) for r in rows.values())
    for sid, row in rows.items():
        cp.write(0, sid, row[len(header) :])  # as the code before versioning wrote it
    cp.save(cp.positions())

    second = _csv(tmp_path / "b.csv", 3, 5, 100, 1)
    got = _run(tmp_path, bundle, tmp_path / "b.csv", "second")
    for sid in first:
        want = ref.run(np.concatenate([first[sid], second[sid]])[:, None])[-len(second[sid]) :]
        np.testing.assert_allclose(got[sid], want, atol=1e-5, err_msg=sid)
    assert all(r.startswith(header) for r in LocalCheckpoint(tmp_path / "state").read([0])[0].values())


def test_a_bundle_saved_before_a_new_spec_field_with_a_default_loads(ref_factory, tmp_path, monkeypatch):
    """Bundles store the spec as JSON of its fields; a newer release that adds a field with a default
    reads an older bundle with the default, and the states it wrote still load (same layout)."""
    from dataclasses import dataclass

    import models.bundle
    from models.stream_model import ModelSpec

    @dataclass(frozen=True)
    class NewerSpec(ModelSpec):
        serve_dropout: float = 0.0  # the simulated new field

    bundle, ref = _bundle(ref_factory, tmp_path, "gru", 2, 16)
    monkeypatch.setattr(models.bundle, "ModelSpec", NewerSpec)
    newer = models.bundle.load_bundle(bundle)
    assert isinstance(newer.spec, NewerSpec) and newer.spec.serve_dropout == 0.0
    rows = StateCodec(state_layout(ref.model), []).encode(_rows(np.random.default_rng(5), 2), ["a", "b"])
    engine, _ = StateCodec(state_layout(newer), []).decode(rows)
    assert engine.shape == (2, 32)


def test_a_restore_of_more_streams_than_a_stage_table_holds_loads_every_row():
    """``load_extra`` after ``decode_table`` with more streams than the table's first capacity (1024): the
    table grows while the rows are placed (it used to write into the array it had just replaced)."""
    codec = _codec(extra=3)
    ids = [f"s{i}" for i in range(1500)]
    tail = np.random.default_rng(6).standard_normal((len(ids), 3))
    codec.tables[0].load(ids[:10], tail[:10])
    rows = codec.encode(_rows(np.random.default_rng(7), len(ids)), ids)
    fresh = _codec(extra=3)
    got_ids, _engine, extra = fresh.decode_table(dict(zip(ids, rows, strict=True)))
    fresh.load_extra(got_ids, extra)
    np.testing.assert_array_equal(fresh.tables[0].export(ids[:10]), tail[:10])
    np.testing.assert_array_equal(fresh.tables[0].export(ids[10:]), np.tile([0.0, 1.0, 2.0], (1490, 1)))


# ---- through the Kafka changelog of a real broker ----------------------------------------------------------
def _kafka_config(tmp_path: Path, bundle: Path, bootstrap: str, topic: str, name: str) -> Path:
    cfg = {
        "model": str(bundle),
        "kafka": {"bootstrap_servers": bootstrap, "instance_id": "0"},
        "source": {"type": "kafka", "topics": [topic], "group_id": f"g-{topic}", "format": "json"},
        "sink": {"type": "kafka", "topic": f"{topic}-out"},
        "dead_letters": {"type": "kafka", "topic": f"{topic}-dlq"},
        "checkpoint": {"interval_ms": 50},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _json_x(x: np.ndarray) -> bytes:
    return json.dumps({"x": x.tolist()}).encode()


def _kafka_produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in records:
        producer.send(topic, key=key, value=value, partition=0)
    producer.flush()
    producer.close()


def _kafka_outputs(bootstrap: str, topic: str, expected: int, timeout_s: float = 90) -> list[dict]:
    """The first ``expected`` committed output documents of ``topic``, with their stream."""
    import time

    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", isolation_level="read_committed"
    )
    docs: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(docs) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                docs.extend({"stream": r.key.decode(), **json.loads(r.value)} for r in batch)
    finally:
        consumer.close()
    return docs


def _serve(config: Path, until) -> None:
    """The service of ``config`` in a thread until ``until()`` returns; re-raises what ``run`` raised."""
    import threading

    pipeline = build_pipeline(load_config(config))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            pipeline.run()
        except BaseException as exc:  # handed to the test
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        until(thread)
    finally:
        pipeline.stop()
        thread.join(60)
    assert not thread.is_alive()
    if failure:
        raise failure[0]


@pytest.mark.integration
@pytest.mark.kafka
def test_kafka_changelog_rows_are_versioned_garbage_restarts_one_stream_another_layout_is_refused(
    ref_factory, tmp_path, kafka_cluster
):
    import time

    from kafka.admin import KafkaAdminClient, NewTopic

    bootstrap, topic = kafka_cluster.bootstrap, f"records-{time.monotonic_ns()}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1)])
    admin.close()
    ref = ref_factory("gru", input_size=3, hidden_size=16, num_layers=2)
    bundle = save_bundle(ref.model, tmp_path / "gru-2x16.safetensors")
    rng = np.random.default_rng(9)
    xs = {f"s{i}": rng.standard_normal((10, 3)).astype(np.float32) for i in range(4)}

    def send(steps: range) -> None:
        _kafka_produce(bootstrap, topic, [(s.encode(), _json_x(x[t])) for t in steps for s, x in xs.items()])

    # the first half, then a garbage row for s1 in the changelog, then the second half
    send(range(5))
    config = _kafka_config(tmp_path, bundle, bootstrap, topic, "first")
    changelog = load_config(config).changelog_topic
    _serve(config, lambda _t: _kafka_outputs(bootstrap, f"{topic}-out", 20))
    _kafka_produce(bootstrap, changelog, [(b"s1", b"\x13garbage, not a state row")])
    send(range(5, 10))
    _serve(config, lambda _t: _kafka_outputs(bootstrap, f"{topic}-out", 40))

    docs = _kafka_outputs(bootstrap, f"{topic}-out", 40)
    assert len(docs) == 40
    for sid, x in xs.items():
        got = np.stack([np.asarray(d["y"], np.float32)[0] for d in docs if d["stream"] == sid])
        want = ref.run(x)
        np.testing.assert_allclose(got[:5], want[:5], atol=1e-5, err_msg=sid)
        want_after = ref.run(x[5:]) if sid == "s1" else want[5:]
        np.testing.assert_allclose(got[5:], want_after, atol=1e-5, err_msg=sid)

    other = ref_factory("gru", input_size=3, hidden_size=32, num_layers=1)
    bundle = save_bundle(other.model, tmp_path / "gru-1x32.safetensors")
    config = _kafka_config(tmp_path, bundle, bootstrap, topic, "other")
    with pytest.raises(StateLayoutError, match="state written by gru 2x16 cannot load into gru 1x32"):
        _serve(config, lambda t: t.join(60))
