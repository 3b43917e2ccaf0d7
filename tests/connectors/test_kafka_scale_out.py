"""Scale-out: three service processes in one consumer group on a three-broker cluster. One is killed;
the others take over its partitions with the right stream states."""

from __future__ import annotations

import json
import re
import uuid

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]
ATOL = 1e-5


@pytest.fixture(scope="module")
def three_brokers(tmp_path_factory, kafka_helpers):
    cluster = kafka_helpers.start_kafka(3, tmp_path_factory.mktemp("kafka3"))
    yield cluster
    cluster.stop()


def _messages(events):
    return [(s.encode(), json.dumps({"x": x.tolist()}).encode()) for s, x in events]


def test_partitions_and_states_move_when_a_process_dies(three_brokers, kafka_helpers, tmp_path):
    h = kafka_helpers
    model, path = h.make_model(tmp_path)
    topic = f"scale-{uuid.uuid4().hex[:8]}"
    run = h.ServiceRun(three_brokers.bootstrap, tmp_path, model, path, topic, f"g-{topic}", partitions=6)
    h.create_topic(run.bootstrap, topic, run.partitions, replication=3)
    rng = np.random.default_rng(7)
    first = h.random_events(rng, streams=300, events=6000, features=3)
    second = h.random_events(rng, streams=300, events=6000, features=3)
    try:
        for instance in ("0", "1", "2"):
            run.start(instance)
        h.produce(run.bootstrap, topic, _messages(first))
        run.consume(run.outputs_topic, len(first), timeout_s=180)
        logs_before = {i: run.log(i) for i in ("0", "1", "2")}
        assert all("assigned" in log for log in logs_before.values()), logs_before
        run.kill("1")
        h.produce(run.bootstrap, topic, _messages(second))
        records = run.consume(run.outputs_topic, len(first) + len(second), timeout_s=240)
        for instance in ("0", "2"):
            assert run.terminate(instance) == 0, run.log(instance)
    finally:
        run.stop_all()
    by_stream, answered = h.outputs_by_stream(records)
    assert len(answered) == len(first) + len(second)
    assert set(answered.values()) == {1}
    expected = h.offline_outputs(model, first + second)
    assert set(by_stream) == set(expected)
    for sid, docs in by_stream.items():
        got = np.concatenate([np.asarray(d["y"], np.float32) for d in docs])
        np.testing.assert_allclose(got, expected[sid], atol=ATOL, err_msg=sid)
    # After the kill, the survivors restored the dead process's streams from the changelog.
    after_kill = "".join(run.log(i)[len(logs_before[i]) :] for i in ("0", "2"))
    restored = [int(n) for n in re.findall(r"restored (\d+) streams", after_kill)]
    assert sum(restored) > 0, after_kill
