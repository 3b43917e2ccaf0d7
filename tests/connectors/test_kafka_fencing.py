"""Zombie fencing against the real broker: a service process that stalls past its session timeout (SIGSTOP)
while its partitions move to another process must not commit anything for them when it wakes."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]
ATOL = 1e-5


def _messages(events):
    return [(s.encode(), json.dumps({"x": x.tolist()}).encode()) for s, x in events]


def _restored(log: str) -> int:
    return sum(int(n) for n in re.findall(r"restored (\d+) streams", log))


def _committed(bootstrap: str, group: str) -> dict[int, int]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {tp.partition: o.offset for tp, o in admin.list_consumer_group_offsets(group).items()}
    finally:
        admin.close()


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize(  # confluent-kafka fenced before this test existed: one variant guards it
    ("service", "transaction_timeout_s", "stall_s"),
    [("kafka-python", 30, 0), ("kafka-python", 8, 12), ("confluent-kafka", 8, 12)],
    ids=[
        "kafka-python-within-transaction-timeout",
        "kafka-python-past-transaction-timeout",
        "confluent-kafka-past-transaction-timeout",
    ],
    indirect=["service"],
)
def test_a_stalled_process_cannot_commit_for_partitions_it_lost(
    service, kafka_helpers, transaction_timeout_s, stall_s
):
    """Two processes of one group share live input. Process 0 is stopped (SIGSTOP) with a transaction
    open (its outputs not yet committed) for longer than the session timeout (6 s); process 1 takes its
    partitions, restores their states and answers the same inputs. Then process 0 continues (SIGCONT).

    - Within the transaction timeout (30 s) the broker has not aborted process 0's transaction: whatever
      it still holds must be refused (its offsets are from a generation it is no longer in).
    - Past it (8 s; stopped for at least 12 s) the broker aborted it and fenced the producer: process 0
      must recover, not exit. (So must it when the stop lands inside a commit whose offsets the broker
      already holds: process 1 then waits for them to settle until the transaction times out.)

    Every input is answered once, the outputs equal the offline computation, and a third process started
    afterwards continues every stream from the committed state and offsets."""
    h = kafka_helpers
    service.extra = {"checkpoint": {"transaction_timeout_ms": transaction_timeout_s * 1000}}
    rng = np.random.default_rng(11)
    first = h.random_events(rng, streams=200, events=24_000, features=3)
    second = h.random_events(rng, streams=200, events=400, features=3)
    service.start("0")
    service.start("1")
    _wait_for(lambda: all("assigned partitions" in service.log(i) for i in "01"), 60, "no assignment")
    producer = threading.Thread(
        target=h.produce_paced, args=(service.bootstrap, service.topic, _messages(first), 1000)
    )
    producer.start()
    try:
        _wait_for(lambda: h.committed_total(service.bootstrap, service.group) > 2000, 60, "nothing committed")
        restored_before = _restored(service.log("1"))
        at_stop = _committed(service.bootstrap, service.group)
        zombie = service.procs["0"]
        zombie.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            _wait_for(
                lambda: _restored(service.log("1")) > restored_before, 60, "process 1 took nothing over"
            )
            time.sleep(3)  # process 1 answers the inputs process 0 had answered in its open transaction
            time.sleep(max(0.0, stopped + stall_s - time.monotonic()))
        finally:
            zombie.send_signal(signal.SIGCONT)
    finally:
        producer.join()
    total = len(first) + len(second)
    service.consume(service.outputs_topic, len(first), timeout_s=180)
    time.sleep(2)  # a zombie commit, if any, lands now
    for instance in ("0", "1"):
        assert service.terminate(instance) == 0, service.log(instance)
    h.produce(service.bootstrap, service.topic, _messages(second))
    service.start("2")
    _wait_for(
        lambda: h.committed_total(service.bootstrap, service.group) >= total, 120, "input not committed"
    )
    assert service.terminate("2") == 0, service.log("2")
    records = h.consume_all(service.bootstrap, service.outputs_topic, 2 * total, timeout_s=10)
    by_stream, answered = h.outputs_by_stream(records)
    twice = sorted(pos for pos, n in answered.items() if n > 1)
    spans = {p: (min(o for q, o in twice if q == p), max(o for q, o in twice if q == p)) for p, _ in twice}
    assert not twice, (
        f"{len(twice)} answered more than once, offsets by partition {spans}; committed {at_stop}"
    )
    assert len(answered) == len(first) + len(second)
    expected = h.offline_outputs(service.model, first + second)
    assert set(by_stream) == set(expected)
    for sid, docs in by_stream.items():
        got = np.concatenate([np.asarray(d["y"], np.float32) for d in docs])
        np.testing.assert_allclose(got, expected[sid], atol=ATOL, err_msg=sid)
