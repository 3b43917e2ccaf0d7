"""Fine-tuning inside the Kafka service: labels inline and from the feedback topic (by latest steps, by
step span, by input offsets), bad feedback to the dead-letter topic, progress on the admin endpoint, and
a clean shutdown. Against the real broker, with the worker in its own process."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from rnnstream.admin import call_admin

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_labels_from_messages_and_the_feedback_topic_reach_the_worker(kafka_cluster, kafka_helpers, tmp_path):
    h = kafka_helpers
    model, path = h.make_model(tmp_path)
    topic = f"ft-{time.monotonic_ns() % 10**8}"
    run = h.ServiceRun(kafka_cluster.bootstrap, tmp_path, model, path, topic, f"g-{topic}", partitions=2)
    feedback_topic = f"{topic}-feedback"
    port = _free_port()
    run.extra = {
        "source": {"feedback_topic": feedback_topic},
        "finetune": {
            "target": "feedback",
            "loss": "cross_entropy",
            "k1": 2,
            "k2": 4,
            "min_train_chunks": 4,
            "versions_dir": str(tmp_path / "versions"),
        },
        "metrics_port": port,
    }
    h.create_topic(run.bootstrap, topic, 2)
    rng = np.random.default_rng(0)
    streams = [f"s{i}" for i in range(8)]
    messages, inline_labelled = [], 0
    for step in range(12):
        for i, sid in enumerate(streams):
            doc: dict = {"x": rng.standard_normal(3).tolist()}
            if step % 4 == 3 and i < 4:  # inline label for this message's one timestep
                doc["label"] = i % 2
                inline_labelled += 1
            messages.append((sid.encode(), json.dumps(doc).encode()))
    h.produce(run.bootstrap, topic, messages)
    try:
        run.start()
        outputs = run.consume(run.outputs_topic, len(messages))
        assert len(outputs) == len(messages)
        offsets = {}  # stream → input offsets of its messages
        for rec in outputs:
            doc = json.loads(rec.value)
            offsets.setdefault(rec.key.decode(), []).append(doc["offset"])
        good = [
            (b"s0", {"label": 1, "last": 3}),  # 3 steps
            (b"s1", {"label": 0, "start": 2, "end": 7}),  # 5 steps
            (b"s2", {"label": 1, "offsets": sorted(offsets["s2"])[4:6]}),  # 2 messages of 1 step
            (b"s3", {"label": 0}),  # the latest step
        ]
        bad = [
            (b"s4", b"{not json", "not valid json"),
            (b"s4", json.dumps({"label": "cat"}).encode(), "label must be a class id"),
            (b"s4", json.dumps({"label": 1, "last": 2, "offsets": [0, 1]}).encode(), "one way"),
            (b"s4", json.dumps({"label": 1, "when": 3}).encode(), "unknown feedback keys"),
            (b"s4", json.dumps({"label": 1, "offsets": [10**9, 10**9]}).encode(), "not in recent history"),
            (None, json.dumps({"label": 1}).encode(), "missing key"),
        ]
        h.produce(
            run.bootstrap,
            feedback_topic,
            [(k, json.dumps(v).encode()) for k, v in good] + [(k, v) for k, v, _ in bad],
        )
        expected_labels = inline_labelled + 3 + 5 + 2 + 1
        deadline = time.monotonic() + 60
        stats = call_admin(f"127.0.0.1:{port}", "/stats")
        while stats["service"]["labels"] < expected_labels and time.monotonic() < deadline:
            time.sleep(0.2)
            stats = call_admin(f"127.0.0.1:{port}", "/stats")
        assert stats["service"]["labels"] == expected_labels, run.log()[-3000:]
        assert stats["finetune"]["buffer"]["labels"] == expected_labels
        dead = h.consume_all(run.bootstrap, run.dlq_topic, len(bad), timeout_s=60)
        reasons = sorted(dict(r.headers)["reason"].decode() for r in dead)
        assert len(reasons) == len(bad), reasons
        for _, _, why in bad:
            assert any(why in r and r.startswith("feedback:") for r in reasons), (why, reasons)
        # The worker trains on those labels (rounds run; whether a version is better is its call).
        deadline = time.monotonic() + 60
        while call_admin(f"127.0.0.1:{port}", "/stats")["finetune"]["rounds"] == 0:
            assert time.monotonic() < deadline, run.log()[-3000:]
            time.sleep(0.2)
        assert run.terminate() == 0, run.log()[-3000:]
    finally:
        run.stop_all()
