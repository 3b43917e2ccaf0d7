"""Text streams end to end: a trained torch ``Embedding → GRU/LSTM → Linear`` loads as it is; users'
messages, interleaved in any order, become token events through the tokenizer, and the label at each
user's end marker equals the torch module run over that user's whole token sequence (1e-5). Through
``rnnstream run``: the shipped sentiment config labels each end marker, a malformed message is a dead
letter and touches no other stream."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from connectors.base import Message
from connectors.text import UNKNOWN, TextDecoder, Tokenizer
from engine import Engine
from models import ModelInfo, from_torch, load_bundle
from rnnstream.checkpoint import EphemeralState
from rnnstream.pipeline import Pipeline
from rnnstream.text import TextLabels
from tests.rnnstream.test_pipeline import ListDeadLetters, ListSink, ListSource

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "models" / "assets" / "sentiment_gru.safetensors"
ATOL = RTOL = 1e-5
WORDS = ["great", "phone", "awful", "battery", "not", "good", "!", ",", "love", "it"]


def torch_sentiment(kind: str, vocabulary: int, seed: int) -> tuple[nn.Embedding, nn.Module, nn.Linear]:
    """A torch ``Embedding(V, 5) → GRU/LSTM(5, 7) → Linear(7, 3)`` with seeded random weights."""
    torch.manual_seed(seed)
    rnn = nn.GRU(5, 7) if kind == "gru" else nn.LSTM(5, 7, num_layers=2)
    return nn.Embedding(vocabulary, 5), rnn, nn.Linear(7, 3)


@torch.no_grad()
def torch_label(parts: tuple[nn.Embedding, nn.Module, nn.Linear], ids: list[int]) -> np.ndarray:
    """The torch module over a whole token sequence: ``softmax(W h_T + b)``, ``(3,)``."""
    embedding, rnn, linear = parts
    hs, _ = rnn(embedding(torch.tensor(ids)[:, None]))  # (T, 1, H)
    return torch.softmax(linear(hs[-1, 0]), -1).numpy()


HOSTILE = [
    b'{"text": 5, "user": "%s"}',  # wrong type
    b'{"text": "great", "user": "%s", "control": "stop"}',  # unknown control
    b'{"text": " \\u0000 ", "user": "%s"}',  # no tokens
    b'{"text": "great", "user": "%s"',  # cut JSON
    b'\xff{"text": "%s"}',  # invalid UTF-8
]


@st.composite
def conversations(draw):
    """Per user 1-2 conversations of 1-3 messages (known words, unknown words, odd characters), each
    conversation's last message with an end marker; hostile messages of random users mixed in; all
    interleaved in a random order that keeps each user's own order; polled in batches of random size."""
    odd = st.sampled_from([*WORDS, "zebra", "GREAT", "é", "🙂", "\x07"])
    text = st.builds(
        lambda w, rest: " ".join([*rest, w]), st.sampled_from([*WORDS, "zebra"]), st.lists(odd, max_size=8)
    )
    talk = st.lists(text, min_size=1, max_size=3)
    users = draw(st.lists(st.lists(talk, min_size=1, max_size=2), min_size=1, max_size=5))
    per_user = []
    for u, talks in enumerate(users):
        msgs = [
            {"text": t, "user": f"user-{u}", **({"control": "end"} if k == len(c) - 1 else {})}
            for c in talks
            for k, t in enumerate(c)
        ]
        for _ in range(draw(st.integers(0, 2))):  # hostile messages at random places of the user's stream
            at = draw(st.integers(0, len(msgs) - 1))  # never after the last end
            msgs.insert(at, draw(st.sampled_from(HOSTILE)) % f"user-{u}".encode())
        per_user.append(msgs)
    order = draw(st.permutations([u for u, msgs in enumerate(per_user) for _ in msgs]))
    return (
        per_user,
        order,
        draw(st.integers(1, 9)),
        draw(st.sampled_from(["gru", "lstm"])),
        draw(st.integers(0, 99)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_interleaved_users_labels_equal_the_torch_module_over_each_whole_token_sequence(scenario):
    """Through the pipeline (in-memory source and sink): one document per end marker, equal to the torch
    module over the tokens of that conversation's accepted messages; each hostile message is a dead
    letter and changes nothing for anyone."""
    per_user, order, poll, kind, seed = scenario
    tokenizer = Tokenizer((UNKNOWN, *WORDS))
    parts = torch_sentiment(kind, tokenizer.size, seed)
    embedding, rnn, linear = parts
    model = from_torch(rnn, linear, head_kind="classifier", embedding=embedding)
    sent = [0] * len(per_user)
    messages, expected, tokens = [], [], defaultdict(list)
    for u in order:
        msg = per_user[u][sent[u]]
        sent[u] += 1
        messages.append(
            Message(msg if isinstance(msg, bytes) else json.dumps(msg).encode(), None, 0, len(messages))
        )
        if isinstance(msg, dict):
            tokens[u] += tokenizer.encode(msg["text"])
            if msg.get("control") == "end":
                expected.append((f"user-{u}", torch_label(parts, tokens.pop(u))))
    sink, dead = ListSink(), ListDeadLetters()
    engine = Engine(model, device="cpu", freeze_gc=False)
    scoring = TextLabels(["a", "b", "c"])
    Pipeline(
        engine, ListSource(messages, poll), TextDecoder(tokenizer), sink, dead, EphemeralState(), scoring
    ).run()
    assert len(dead.outputs) == sum(isinstance(m, bytes) for msgs in per_user for m in msgs)
    got = [(o.stream_id, o.doc) for o in sink.outputs]
    assert [sid for sid, _ in got] == [sid for sid, _ in expected]  # one label per end marker, in order
    for (sid, doc), (_, y) in zip(got, expected, strict=True):
        np.testing.assert_allclose(doc["y"], y, atol=ATOL, rtol=RTOL, err_msg=sid)
        assert doc["label"] == "abc"[int(np.argmax(y))] and doc["control"] == "end"


def test_outputs_messages_gives_each_message_the_label_so_far_after_its_last_token():
    """``text.outputs: messages``: one document per message, ``y`` the torch module over the user's
    tokens up to the message's last one, ``tokens`` its token count; and the end marker's label."""
    tokenizer = Tokenizer((UNKNOWN, *WORDS))
    parts = torch_sentiment("gru", tokenizer.size, 5)
    model = from_torch(parts[1], parts[2], head_kind="classifier", embedding=parts[0])
    texts = [("u1", "great phone"), ("u2", "awful !"), ("u1", "not good , zebra"), ("u2", "love it")]
    messages = [
        Message(json.dumps({"text": t, "user": u}).encode(), None, 0, k) for k, (u, t) in enumerate(texts)
    ]
    messages.append(Message(b'{"control": "end", "user": "u1"}', None, 0, len(messages)))
    sink, dead = ListSink(), ListDeadLetters()
    engine = Engine(model, device="cpu", freeze_gc=False)
    scoring = TextLabels(["a", "b", "c"], every_message=True)
    Pipeline(
        engine, ListSource(messages, 3), TextDecoder(tokenizer), sink, dead, EphemeralState(), scoring
    ).run()
    assert not dead.outputs and [o.stream_id for o in sink.outputs] == ["u1", "u2", "u1", "u2", "u1"]
    history: dict[str, list[int]] = defaultdict(list)
    for (user, text), out in zip(texts, sink.outputs, strict=False):
        ids = tokenizer.encode(text)
        history[user] += ids
        assert out.doc["tokens"] == len(ids)
        np.testing.assert_allclose(out.doc["y"], torch_label(parts, history[user]), atol=ATOL, rtol=RTOL)
    end = sink.outputs[-1].doc
    assert end["control"] == "end"
    np.testing.assert_allclose(end["y"], torch_label(parts, history["u1"]), atol=ATOL, rtol=RTOL)


def test_the_shipped_sentiment_model_is_small_ships_its_tokenizer_and_reports_held_out_accuracy():
    assert ASSET.stat().st_size < 1_000_000
    model = load_bundle(ASSET)
    tokenizer = Tokenizer.from_features(model.info.features)
    assert model.categorical and tokenizer.size <= model.spec.num_embeddings
    assert model.info.features["classes"] == ["negative", "positive"]
    trained = model.info.trained_on
    assert {"test_accuracy", "majority_class_test_accuracy", "lexicon_test_accuracy"} <= set(trained)
    with torch.no_grad():  # it has learned something: clear sentences go the obvious way
        good, bad = (tokenizer.encode(t) for t in ("i love it , great phone", "awful , do not buy"))
        assert model(torch.tensor(good)[:, None])[0][-1, 0, 1] > 0.5
        assert model(torch.tensor(bad)[:, None])[0][-1, 0, 0] > 0.5


def test_from_torch_keeps_the_tokenizer_in_the_bundle(tmp_path):
    from models import save_bundle

    tokenizer = Tokenizer((UNKNOWN, *WORDS))
    embedding, rnn, linear = torch_sentiment("gru", tokenizer.size, 0)
    info = ModelInfo(features={"tokenizer": tokenizer.to_features(), "classes": ["a", "b", "c"]})
    save_bundle(
        from_torch(rnn, linear, head_kind="classifier", embedding=embedding, info=info), tmp_path / "m"
    )
    assert Tokenizer.from_features(load_bundle(tmp_path / "m").info.features) == tokenizer


# ---- through ``rnnstream run`` ---------------------------------------------------------------------------
def _offline_labels(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per user, the shipped model run offline (``StreamModel.forward``) over all tokens of the user's
    messages up to the end marker."""
    model = load_bundle(ASSET)
    tokenizer = Tokenizer.from_features(model.info.features)
    tokens: dict[str, list[int]] = {}
    out = {}
    for row in rows:
        tokens.setdefault(row["user"], []).extend(tokenizer.encode(row["text"]))
        if row["control"] == "end":
            with torch.no_grad():
                ys, _ = model(torch.tensor(tokens.pop(row["user"]))[:, None])
            out[row["user"]] = ys[-1, 0].numpy()
    return out


def _run(config: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "rnnstream.cli", "run", str(config)]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_the_shipped_text_config_labels_each_user_at_the_end_marker_as_the_model_offline():
    proc = _run(REPO / "configs" / "text-sentiment.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    with open(REPO / "configs" / "data" / "chat.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = _offline_labels(rows)
    assert sorted(d["stream"] for d in docs) == sorted(expected)  # one document per end marker
    for d in docs:
        np.testing.assert_allclose(d["y"], expected[d["stream"]], atol=ATOL, rtol=RTOL)
        assert d["label"] == ["negative", "positive"][int(np.argmax(d["y"]))] and d["control"] == "end"


@pytest.mark.integration
def test_a_malformed_message_is_a_dead_letter_and_the_other_users_are_labelled_as_offline(tmp_path):
    good = [
        {"timestamp": "1", "user": "ann", "text": "I love this phone", "control": ""},
        {"timestamp": "2", "user": "bob", "text": "Awful battery.", "control": ""},
        {"timestamp": "3", "user": "ann", "text": None, "control": "stop"},  # unknown control
        {"timestamp": "4", "user": "bob", "text": "", "control": ""},  # no text, no control
        {"timestamp": "5", "user": "cat", "text": "word " * 600, "control": "end"},  # > max tokens
        {"timestamp": "6", "user": "ann", "text": "great screen!", "control": "end"},
        {"timestamp": "7", "user": "bob", "text": "never again", "control": "end"},
        {"timestamp": "8", "user": "dan", "text": "", "control": "end"},  # an end for no stream
    ]
    data = tmp_path / "chat.csv"
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, ["timestamp", "user", "text", "control"])
        writer.writeheader()
        writer.writerows(good)
    cfg = yaml.safe_load((REPO / "configs" / "text-sentiment.yaml").read_text())
    cfg["model"] = str(ASSET)
    cfg["source"]["paths"] = [str(data)]
    cfg["sink"] = {"type": "jsonl", "path": str(tmp_path / "out.jsonl")}
    cfg["dead_letters"] = {"type": "file", "path": str(tmp_path / "dlq.jsonl")}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = _run(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = {d["stream"]: d for d in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    letters = [json.loads(line) for line in (tmp_path / "dlq.jsonl").read_text().splitlines()]
    reasons = " | ".join(str(letter) for letter in letters)
    assert len(letters) == 4, reasons
    for why in ("unknown control", "missing 'text'", "oversized", "control 'end'"):
        assert why in reasons, reasons
    accepted = [r for r in good if r["user"] in ("ann", "bob") and r["text"]]
    expected = _offline_labels(accepted)
    assert sorted(docs) == ["ann", "bob"]
    for user, y in expected.items():
        np.testing.assert_allclose(docs[user]["y"], y, atol=ATOL, rtol=RTOL)


def test_a_text_config_is_refused_for_a_model_without_token_ids_or_tokenizer(tmp_path):
    from rnnstream.config import load_config
    from rnnstream.service import check

    cfg = yaml.safe_load((REPO / "configs" / "text-sentiment.yaml").read_text())
    cfg["source"]["paths"] = [str(REPO / "configs" / "data" / "chat.csv")]
    for model, why in [("sensor_lstm", "token ids"), ("sentiment_gru", None)]:
        cfg["model"] = str(REPO / "models" / "assets" / f"{model}.safetensors")
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        if why is None:
            assert "csv source" in check(load_config(tmp_path / "run.yaml"))
        else:
            with pytest.raises(ValueError, match=why):
                check(load_config(tmp_path / "run.yaml"))


@pytest.mark.integration
@pytest.mark.mqtt
def test_chat_messages_over_mqtt_are_labelled_at_each_end_marker(tmp_path, mqtt_broker):
    """A real broker: messages on ``chat/<user>`` (the topic level names the user), a malformed one a
    dead letter; each end marker's label equals the model run offline over the user's accepted tokens."""
    import time

    from tests.rnnstream.test_service import Service, _publish, _wait_subscribed, jsonl, wait_for

    out, dlq = tmp_path / "out.jsonl", tmp_path / "dlq.jsonl"
    cfg = yaml.safe_load((REPO / "configs" / "text-sentiment.yaml").read_text())
    cfg.update(
        model=str(ASSET),
        source={"type": "mqtt", "topic": "chat/+", "qos": 1},
        mqtt={"broker": mqtt_broker.address, "client_id": f"text-{time.monotonic_ns()}"},
        sink={"type": "jsonl", "path": str(out)},
        dead_letters={"type": "file", "path": str(dlq)},
    )
    config = tmp_path / "mqtt.yaml"
    config.write_text(yaml.safe_dump(cfg))
    talk = {
        "ann": [{"text": "Great phone, I love it."}, {"text": 5}, {"text": "Works well!", "control": "end"}],
        "bob": [{"text": "The battery died in a day."}, {"text": "Awful.", "control": "end"}],
    }
    svc = Service(config)
    try:
        _wait_subscribed(mqtt_broker, svc)
        for user, docs in talk.items():
            _publish(mqtt_broker, f"chat/{user}", docs)
        wait_for(lambda: len(jsonl(out, torn=0)) == 2 and dlq.exists(), 60, "two labels", svc)
    finally:
        assert svc.stop() == 0, svc.log()
    docs = {d["stream"]: d for d in jsonl(out, torn=0)}
    letters = jsonl(dlq, torn=0)
    assert len(letters) == 1 and "must be a string" in letters[0]["reason"], letters
    rows = [
        {"user": user, "text": d["text"], "control": d.get("control", "")}
        for user, msgs in talk.items()
        for d in msgs
        if isinstance(d["text"], str)
    ]
    expected = _offline_labels(rows)
    assert sorted(docs) == sorted(expected) == ["ann", "bob"]
    for user, y in expected.items():
        np.testing.assert_allclose(docs[user]["y"], y, atol=ATOL, rtol=RTOL)


@pytest.mark.integration
@pytest.mark.kafka
def test_chat_messages_from_kafka_keyed_by_user_are_labelled_at_each_end_marker(tmp_path, kafka_cluster):
    """A real Kafka topic: the record key names the user; a record that is no JSON is a dead letter."""
    import time

    from kafka import KafkaProducer

    from tests.rnnstream.test_service import Service, jsonl, wait_for

    topic = f"chat-{time.monotonic_ns()}"
    out, dlq = tmp_path / "out.jsonl", tmp_path / "dlq.jsonl"
    cfg = yaml.safe_load((REPO / "configs" / "text-sentiment.yaml").read_text())
    cfg.update(
        model=str(ASSET),
        kafka={"bootstrap_servers": kafka_cluster.bootstrap},
        source={"type": "kafka", "topics": [topic], "group_id": f"g-{topic}"},
        sink={"type": "jsonl", "path": str(out)},
        dead_letters={"type": "file", "path": str(dlq)},
    )
    config = tmp_path / "kafka.yaml"
    config.write_text(yaml.safe_dump(cfg))
    records = [
        (b"ann", {"text": "What a lovely place, the staff were great."}),
        (b"bob", {"text": "Cold food and rude waiters."}),
        (b"ann", "not json"),
        (b"bob", {"text": "Never again.", "control": "end"}),
        (b"ann", {"control": "end"}),
    ]
    svc = Service(config)
    try:
        producer = KafkaProducer(bootstrap_servers=kafka_cluster.bootstrap)
        for key, doc in records:
            producer.send(
                topic, key=key, value=doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
            )
        producer.flush()
        producer.close()
        wait_for(
            lambda: len(jsonl(out, torn=0)) == 2 and len(jsonl(dlq, torn=0)) == 1, 120, "two labels", svc
        )
    finally:
        assert svc.stop() == 0, svc.log()
    docs = {d["stream"]: d for d in jsonl(out, torn=0)}
    rows = [
        {"user": key.decode(), "text": doc.get("text", ""), "control": doc.get("control", "")}
        for key, doc in records
        if isinstance(doc, dict)
    ]
    expected = _offline_labels(rows)
    assert sorted(docs) == sorted(expected) == ["ann", "bob"]
    for user, y in expected.items():
        np.testing.assert_allclose(docs[user]["y"], y, atol=ATOL, rtol=RTOL)
