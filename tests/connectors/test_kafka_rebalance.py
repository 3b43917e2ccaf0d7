"""Incremental cooperative rebalancing against the real broker (confluent-kafka; kafka-python 2.x has only
the eager protocol): partitions that stay with a process keep their streams, only moved ones are restored."""

from __future__ import annotations

import json
import re
import time
import uuid

import numpy as np
import pytest

from connectors.kafka import ClientSettings
from connectors.kafka_confluent import ConfluentKafkaClient

pytestmark = [pytest.mark.integration, pytest.mark.kafka]
ATOL = 1e-5
COOPERATIVE = {"partition.assignment.strategy": "cooperative-sticky"}


def _client(bootstrap: str, group: str, instance: str, consumer: dict) -> ConfluentKafkaClient:
    timeouts = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
    return ConfluentKafkaClient(ClientSettings(bootstrap, group, instance, consumer={**timeouts, **consumer}))


@pytest.mark.parametrize("strategy", [COOPERATIVE, {}], ids=["cooperative", "default"])
def test_the_client_tracks_its_assignment_through_incremental_rebalances(
    kafka_cluster, kafka_helpers, strategy
):
    """Two clients of one group: each one's ``assigned_partitions`` (what rewind and reload after an abort
    use) is the consumer's real assignment, also after the second joined and took some partitions."""
    topic = f"coop-{uuid.uuid4().hex[:8]}"
    kafka_helpers.create_topic(kafka_cluster.bootstrap, topic, 4)
    group = f"g-{topic}"
    calls: dict[str, list] = {"a": [], "b": []}
    clients = {name: _client(kafka_cluster.bootstrap, group, name, strategy) for name in calls}
    try:
        for name, client in clients.items():
            client.start(
                [topic],
                lambda ps, n=name: calls[n].append(("assigned", ps)),
                lambda ps, n=name: calls[n].append(("revoked", ps)),
            )
            if name == "a":
                _poll_until(clients, lambda: clients["a"].consumer.assignment(), "a got nothing")

        def split() -> bool:
            held = [{tp.partition for tp in c.consumer.assignment()} for c in clients.values()]
            return all(held) and held[0].isdisjoint(held[1]) and len(held[0] | held[1]) == 4

        _poll_until(clients, split, "the partitions were not split between the two clients")
        for _ in range(20):  # let any callback still due run
            for client in clients.values():
                client.poll(0.05, 10)
        for name, client in clients.items():
            real = sorted({tp.partition for tp in client.consumer.assignment()})
            assert client.assigned_partitions() == real, (name, calls[name])
    finally:
        for client in clients.values():
            client.close()


def _poll_until(clients: dict, condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        for client in clients.values():
            if client.consumer is not None:  # started
                client.poll(0.05, 10)


def _messages(events):
    return [(s.encode(), json.dumps({"x": x.tolist()}).encode()) for s, x in events]


def _restores(log: str) -> list[tuple[list[int], int]]:
    found = re.findall(r"assigned partitions \[([\d, ]*)\]: restored (\d+) streams", log)
    return [([int(p) for p in ps.split(",") if p.strip()], int(n)) for ps, n in found]


@pytest.fixture
def service(kafka_cluster, kafka_helpers, tmp_path):
    """A confluent-kafka service run (kafka-python 2.x has no cooperative rebalancing: every rebalance is
    eager there, and reloads every partition)."""
    h = kafka_helpers
    model, path = h.make_model(tmp_path)
    topic = f"in-{uuid.uuid4().hex[:8]}"
    run = h.ServiceRun(kafka_cluster.bootstrap, tmp_path, model, path, topic, f"g-{topic}", partitions=4)
    run.library = "confluent-kafka"
    h.create_topic(kafka_cluster.bootstrap, topic, run.partitions)
    yield run
    run.stop_all()


@pytest.mark.slow
def test_a_joining_process_moves_partitions_without_reloading_the_retained_ones(service, kafka_helpers):
    """Process 0 serves all four partitions; process 1 joins while input keeps coming. With the cooperative
    protocol (confluent-kafka's default here) process 0 restores nothing again: its retained partitions keep
    their streams in memory; process 1 restores the moved partitions' streams. Every input is answered
    once and the outputs equal the offline computation."""
    h = kafka_helpers
    rng = np.random.default_rng(21)
    first = h.random_events(rng, streams=100, events=3000, features=3)
    second = h.random_events(rng, streams=100, events=3000, features=3)
    h.produce(service.bootstrap, service.topic, _messages(first))
    service.start("0")
    service.consume(service.outputs_topic, len(first))
    before = len(service.log("0"))
    service.start("1")
    deadline = time.monotonic() + 60
    while not _restores(service.log("1")):
        assert time.monotonic() < deadline, service.log("1")
        time.sleep(0.2)
    h.produce(service.bootstrap, service.topic, _messages(second))
    records = service.consume(service.outputs_topic, len(first) + len(second))
    for instance in ("0", "1"):
        assert service.terminate(instance) == 0, service.log(instance)
    records = h.consume_all(service.bootstrap, service.outputs_topic, 2 * (len(first) + len(second)), 10)
    after_join = service.log("0")[before:]
    assert sum(n for _, n in _restores(after_join)) == 0, after_join  # nothing reloaded in process 0
    moved = [p for ps, n in _restores(service.log("1")) for p in ps]
    assert moved and sum(n for _, n in _restores(service.log("1"))) > 0
    by_stream, answered = h.outputs_by_stream(records)
    assert set(answered.values()) == {1} and len(answered) == len(first) + len(second)
    expected = h.offline_outputs(service.model, first + second)
    assert set(by_stream) == set(expected)
    for sid, docs in by_stream.items():
        got = np.concatenate([np.asarray(d["y"], np.float32) for d in docs])
        np.testing.assert_allclose(got, expected[sid], atol=ATOL, err_msg=sid)
