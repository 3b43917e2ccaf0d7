"""Utterance mode on Kafka: the buffered frames are stream state in the changelog, so kill -9 in the
middle of utterances loses no frame and answers each end exactly once, with the torch module's result
on the whole utterance."""

from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import pytest

from models import save_bundle
from tests.connectors.test_kafka import _produce_live
from tests.models.utterance_reference import make_utterance_reference

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


def _interleaved(
    rng: np.random.Generator, seqs: dict[str, np.ndarray], group: int
) -> list[tuple[bytes, bytes]]:
    """Every stream's frames (one JSON message each) then its end; streams in groups of ``group``, each
    group's messages interleaved at random, so that utterances end all along."""
    sids = list(seqs)
    out = []
    for lo in range(0, len(sids), group):
        members = sids[lo : lo + group]
        order = rng.permutation([sid for sid in members for _ in range(len(seqs[sid]) + 1)])
        cursor = dict.fromkeys(members, 0)
        for sid in order.tolist():
            k = cursor[sid]
            cursor[sid] += 1
            payload = {"x": seqs[sid][k].tolist()} if k < len(seqs[sid]) else {"control": "end"}
            out.append((sid.encode(), json.dumps(payload).encode()))
    return out


@pytest.mark.slow
def test_kill_9_mid_utterance_loses_no_frame(kafka_cluster, kafka_helpers, tmp_path):
    h = kafka_helpers
    ref = make_utterance_reference("gru", 2, bidirectional=True, input_size=3, max_frames=40)
    path = save_bundle(ref.model, tmp_path / "utterance.safetensors")
    topic = f"utt-{uuid.uuid4().hex[:8]}"
    service = h.ServiceRun(kafka_cluster.bootstrap, tmp_path, ref.model, path, topic, f"g-{topic}", 2)
    h.create_topic(service.bootstrap, topic, service.partitions)
    rng = np.random.default_rng(7)
    seqs = {f"u{k}": ref.random_inputs(rng, int(n)) for k, n in enumerate(rng.integers(5, 41, 150))}
    messages = _interleaved(rng, seqs, group=10)
    rest = threading.Event()
    producer = threading.Thread(target=_produce_live, args=(service.bootstrap, topic, messages, 150, rest))
    producer.start()
    committed_at_kill = []
    try:
        for _ in range(2):  # killed while utterances are half-buffered
            before = h.end_offsets_total(service.bootstrap, service.outputs_topic)
            service.start()
            deadline = time.monotonic() + 60
            while h.end_offsets_total(service.bootstrap, service.outputs_topic) == before:
                assert time.monotonic() < deadline and service.procs["0"].poll() is None, service.log()
                time.sleep(0.05)
            time.sleep(float(rng.uniform(0.3, 1.5)))
            service.kill()
            committed_at_kill.append(h.committed_total(service.bootstrap, service.group))
    finally:
        rest.set()
        producer.join()
    joins = service.log().count("assigned partitions")
    service.start()
    records = service.consume(service.outputs_topic, len(seqs), timeout_s=180)
    deadline = time.monotonic() + 60  # up (its SIGTERM handler installed) before it is stopped
    while service.log().count("assigned partitions") == joins and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.terminate() == 0, service.log()
    by_stream, answered = h.outputs_by_stream(records)
    assert set(answered.values()) == {1}, "read_committed outputs must be exactly once"
    assert set(by_stream) == set(seqs)
    for sid, docs in by_stream.items():
        assert len(docs) == 1 and docs[0]["control"] == "end"
        np.testing.assert_allclose(docs[0]["y"][0], ref.run(seqs[sid]), atol=1e-5, rtol=1e-5, err_msg=sid)
    assert all(c < len(messages) for c in committed_at_kill), committed_at_kill  # the kills landed mid-run
