"""MQTT source, sink and dead letters against a real mosquitto, with mosquitto_pub/mosquitto_sub as the
independent clients on the other side."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from connectors.base import DeadLetter, Message, Output
from connectors.mqtt import MqttDeadLetters, MqttError, MqttSink, MqttSource, stream_id_of
from rnnstream.mqtt_broker import free_port

pytestmark = [pytest.mark.integration, pytest.mark.mqtt]


# ---- helpers -----------------------------------------------------------------------------------------
class Recorder:
    """An ``Assignment`` that remembers what it was told."""

    def __init__(self) -> None:
        self.assigned_partitions: list[list[int]] = []

    def assigned(self, partitions: list[int]) -> None:
        self.assigned_partitions.append(partitions)

    def revoked(self, partitions: list[int]) -> None:
        raise AssertionError("an MQTT source never revokes")


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if path is None:
        why = f"{name} not found (scripts/system_deps.sh installs mosquitto-clients)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why} (CI=true: must not skip)")
        pytest.skip(why)
    return path


def _at(broker) -> list[str]:
    return ["-h", broker.host, "-p", str(broker.port)]


def publish_cli(broker, topic: str, lines: list[str], qos: int = 1) -> None:
    """``lines`` as messages on ``topic``, in order, by one ``mosquitto_pub -l`` (an independent client;
    keep the input short: it may disconnect before a long queue is sent)."""
    cmd = [_tool("mosquitto_pub"), *_at(broker), "-q", str(qos), "-t", topic, "-l"]
    subprocess.run(cmd, input="".join(f"{line}\n" for line in lines).encode(), check=True, timeout=20)


def publish(broker, topic: str, lines: list[str], qos: int = 1) -> None:
    """``lines`` as messages on ``topic``, in order, by a plain paho client of its own, waiting for every
    acknowledgement (QoS 1)."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, f"pub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    client.max_inflight_messages_set(100)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, line, qos) for line in lines]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def drain(source: MqttSource, n: int, timeout_s: float = 10.0, key: str | None = None) -> list[Message]:
    """Poll until ``n`` messages (of stream ``key``, when given) arrived or ``timeout_s`` seconds passed;
    returns those."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += [m for m in source.poll(0.05) if key is None or m.key == key]
    return got


def quiet(source: MqttSource, wait_s: float = 0.7) -> list[Message]:
    """Whatever arrives within ``wait_s`` seconds (expected: nothing)."""
    return drain(source, 1, wait_s)


def opened(broker, topic: str, client_id: str, **kwargs) -> MqttSource:
    source = MqttSource(broker.address, topic, client_id, connect_timeout_s=10, **kwargs)
    source.open(Recorder(), {})
    return source


class Subscriber:
    """``mosquitto_sub -C n`` on ``topic``, started and subscribed (its SUBACK seen) before returning."""

    MARK = "=>"  # "@" and "%" are format escapes

    def __init__(self, broker, topic: str, n: int) -> None:
        # line-buffered: mosquitto_sub's stdio would hold the SUBACK line back until it exits
        cmd = [_tool("stdbuf"), "-oL", _tool("mosquitto_sub"), *_at(broker), "-q", "1", "-t", topic]
        cmd += ["-C", str(n), "-W", "20", "-d", "-F", f"{self.MARK} %t %p"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "SUBACK" in line:
                return
        raise AssertionError("mosquitto_sub exited before subscribing")

    def messages(self) -> list[tuple[str, dict]]:
        """``(topic, JSON document)`` of every message, once ``n`` arrived."""
        out, _ = self.proc.communicate(timeout=25)
        rows = [line.split(" ", 2)[1:] for line in out.splitlines() if line.startswith(self.MARK)]
        return [(topic, json.loads(payload)) for topic, payload in rows]

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def prefix() -> str:
    """A topic prefix and client id of one test's own (the session broker is shared)."""
    return f"t{uuid.uuid4().hex[:8]}"


# ---- topic patterns ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("sensors/+", "sensors/dev1", "dev1"),
        ("site/+/sensors/+", "site/a/sensors/dev1", "a/dev1"),
        ("sensors/#", "sensors/a/b/c", "a/b/c"),
        ("site/+/#", "site/a/x/y", "a/x/y"),
        ("site/+/#", "site/a", "a"),
        ("sensors/dev1", "sensors/dev1", "sensors/dev1"),
        ("#", "a/b", "a/b"),
        ("sensors/+", "sensors/dev1/extra", None),
        ("sensors/+", "sensors", None),
        ("sensors/+", "sensors/", None),  # an empty level names no stream
        ("sensors/+", "other/dev1", None),
        ("sensors/dev1", "sensors/dev2", None),
        ("sensors/#", "sensors", None),  # '#' matches the parent level, which names no stream
        ("+/x", "$SYS/x", None),
        ("#", "$SYS/broker", None),
    ],
)
def test_stream_id_of(pattern: str, topic: str, expected: str | None) -> None:
    assert stream_id_of(pattern, topic) == expected


# ---- source ------------------------------------------------------------------------------------------
def test_source_delivers_in_order_with_stream_ids(mqtt_broker, prefix) -> None:
    recorder = Recorder()
    source = MqttSource(mqtt_broker.address, f"{prefix}/site/+/sensors/+", prefix, connect_timeout_s=10)
    assert source.guarantee == "at-least-once"
    source.open(recorder, {})
    try:
        assert recorder.assigned_partitions == [[0]]
        publish_cli(mqtt_broker, f"{prefix}/site/a/sensors/dev1", [f'{{"x": {i}}}' for i in range(50)])
        publish_cli(mqtt_broker, f"{prefix}/site/b/sensors/dev2", [f'{{"x": {i}}}' for i in range(50, 80)])
        got = drain(source, 80)
        assert [m.position for m in got] == list(range(80))
        assert [json.loads(m.payload)["x"] for m in got] == list(range(80))
        assert {m.key for m in got[:50]} == {"a/dev1"} and {m.key for m in got[50:]} == {"b/dev2"}
        assert got[0].topic == f"{prefix}/site/a/sensors/dev1" and got[0].partition == 0
        assert got[0].received <= got[-1].received <= time.monotonic()
        assert source.positions() == {} and not source.exhausted
        assert source.counters()["received"] == 80
    finally:
        source.close()


def test_acknowledged_only_by_commit(mqtt_broker, prefix) -> None:
    """Polled but not committed = not acknowledged: a new process with the client id gets it again, with
    the DUP flag; committed = gone. 300 unacknowledged messages reach the source at once (its Receive
    Maximum; mosquitto's default in-flight window would be 20, this broker's is unlimited)."""
    topic, n = f"{prefix}/sensors/+", 300
    source = opened(mqtt_broker, topic, prefix)
    publish(mqtt_broker, f"{prefix}/sensors/dev1", [str(i) for i in range(n)])
    first = drain(source, n)
    assert [m.payload for m in first] == [str(i).encode() for i in range(n)]
    source.close()  # a crash before the checkpoint

    again = opened(mqtt_broker, topic, prefix)
    redelivered = drain(again, n)
    assert [m.payload for m in redelivered] == [m.payload for m in first]
    assert again.counters()["redelivered"] == n  # with the DUP flag
    again.commit()
    assert again.counters()["acked"] == n
    again.close()

    third = opened(mqtt_broker, topic, prefix)
    try:
        assert quiet(third) == []
    finally:
        third.close()


def test_rollback_gets_the_uncommitted_messages_again(mqtt_broker, prefix) -> None:
    source = opened(mqtt_broker, f"{prefix}/sensors/+", prefix)
    try:
        publish(mqtt_broker, f"{prefix}/sensors/dev1", ["a", "b"])
        assert [m.payload for m in drain(source, 2)] == [b"a", b"b"]
        source.commit()
        publish(mqtt_broker, f"{prefix}/sensors/dev1", ["c", "d"])
        assert [m.payload for m in drain(source, 2)] == [b"c", b"d"]
        assert source.rollback() == [0]
        assert [m.payload for m in drain(source, 2)] == [b"c", b"d"]
        assert quiet(source, 0.3) == []
    finally:
        source.close()


def test_broker_killed_and_restarted(fresh_mqtt_broker, prefix) -> None:
    """SIGKILL mid-run: the source reconnects by itself; what it had not acknowledged comes again (DUP),
    what was published while it was still away waits in its session; nothing is lost."""
    broker = fresh_mqtt_broker
    source = opened(broker, f"{prefix}/sensors/+", prefix, reconnect_backoff_s=(1.0, 1.0))
    try:
        before = [f"before-{i}" for i in range(30)]
        publish(broker, f"{prefix}/sensors/dev1", before)
        assert len(drain(source, 30)) == 30  # polled, not committed
        broker.wait_for_autosave()
        broker.kill()
        broker.restart()
        after = [f"after-{i}" for i in range(30)]
        publish(broker, f"{prefix}/sensors/dev1", after)  # most likely before the source is back
        got = drain(source, 60, timeout_s=15)
        counts = Counter(m.payload.decode() for m in got)
        assert set(counts) == set(before + after)
        c = source.counters()
        assert c["redelivered"] >= 30  # the broker restored the session and its unacknowledged messages
        assert sum(counts.values()) - len(counts) <= c["redelivered"]
        assert c["disconnects"] == 1 and c["reconnects"] == 1
        source.commit()
        assert source.counters()["ack_skipped"] == 30  # the first copies came on the dead connection
    finally:
        source.close()


def test_subscribes_again_when_the_broker_lost_the_session(fresh_mqtt_broker, prefix, caplog) -> None:
    """A broker back without its sessions: the source subscribes again by itself. The outage is counted
    and logged once, however many reconnect attempts fail."""
    broker = fresh_mqtt_broker
    source = opened(broker, f"{prefix}/sensors/+", prefix, reconnect_backoff_s=(0.1, 0.2))
    try:
        broker.kill()
        broker.database.unlink(missing_ok=True)
        time.sleep(0.6)  # a few failed reconnect attempts
        broker.restart()
        deadline = time.monotonic() + 10
        while not (got := drain(source, 1, 0.3)) and time.monotonic() < deadline:
            publish_cli(broker, f"{prefix}/sensors/probe", ["probe"])
        assert got, "no message after the broker restarted without its sessions"
        publish(broker, f"{prefix}/sensors/dev1", [str(i) for i in range(10)])
        got = drain(source, 10, 3, key="dev1")  # a late probe may come too
        assert [m.payload for m in got] == [str(i).encode() for i in range(10)]
        c = source.counters()
        assert c["disconnects"] == 1 and c["reconnects"] == 1 and c["connect_failures"] >= 2
        lost = [r for r in caplog.records if "lost the connection" in r.getMessage()]
        assert len(lost) == 1
    finally:
        source.close()


def test_qos0_queue_drops_the_oldest(mqtt_broker, prefix) -> None:
    source = opened(mqtt_broker, f"{prefix}/sensors/+", prefix, qos=0, max_queued=10)
    try:
        assert source.guarantee == "best-effort"
        publish(mqtt_broker, f"{prefix}/sensors/dev1", [str(i) for i in range(50)], qos=0)
        deadline = time.monotonic() + 5
        while source.counters()["received"] < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [m.payload for m in source.poll(0.1)] == [str(i).encode() for i in range(40, 50)]
        assert source.counters()["dropped"] == 40
    finally:
        source.close()


def test_unreachable_broker_is_a_clear_error() -> None:
    address = f"127.0.0.1:{free_port()}"
    source = MqttSource(address, connect_timeout_s=0.5)
    with pytest.raises(MqttError, match=address):
        source.open(Recorder(), {})


# ---- sink and dead letters ---------------------------------------------------------------------------
def test_sink_publishes_json_per_stream(mqtt_broker, prefix) -> None:
    outputs = [
        Output(f"dev{i % 2}", {"i": i, "y": np.array([i, 0.5], np.float32)}, position=i) for i in range(20)
    ]
    with Subscriber(mqtt_broker, f"{prefix}/scores/#", 20) as sub:
        sink = MqttSink(mqtt_broker.address, f"{prefix}/scores/{{stream}}", prefix, connect_timeout_s=10)
        try:
            sink.write(outputs)
            sink.flush()
            assert sink.counters()["acked"] == 20 and sink.counters()["unacked"] == 0
        finally:
            sink.close()
        messages = sub.messages()
    assert [doc["i"] for _, doc in messages] == list(range(20))
    assert all(topic == f"{prefix}/scores/dev{doc['i'] % 2}" for topic, doc in messages)
    assert messages[3][1]["y"] == [3.0, 0.5]


def test_sink_backpressure_and_flush_timeout(fresh_mqtt_broker, prefix) -> None:
    """With the broker down, ``write`` blocks once ``max_unacked`` publishes wait and ``flush`` fails with
    a clear error; once the broker is back paho resends them and ``flush`` returns."""
    broker = fresh_mqtt_broker
    sink = MqttSink(
        broker.address, f"{prefix}/scores/{{stream}}", prefix, reconnect_backoff_s=(0.1, 0.2), max_unacked=3,
        ack_timeout_s=0.5,
    )  # fmt: skip
    try:
        broker.kill()
        sink.write([Output("a", {"i": i}) for i in range(3)])
        started = time.monotonic()
        with pytest.raises(MqttError, match=broker.address):
            sink.write([Output("a", {"i": 3})])
        assert time.monotonic() - started >= 0.45  # it waited for room first
        with pytest.raises(MqttError, match="did not acknowledge 3"):
            sink.flush()
        broker.restart()
        deadline = time.monotonic() + 10
        while sink.counters()["reconnects"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        sink.flush()
        assert sink.counters()["acked"] == 3 and sink.counters()["unacked"] == 0
    finally:
        sink.close()


def test_sink_without_timeout_rides_out_a_broker_outage(fresh_mqtt_broker, prefix) -> None:
    """``ack_timeout_s=None`` (what ``rnnstream run`` uses): ``write`` and ``flush`` wait for a broker that
    is down (backpressure) instead of failing, and finish once it is back."""
    broker = fresh_mqtt_broker
    sink = MqttSink(
        broker.address, f"{prefix}/scores/{{stream}}", prefix, reconnect_backoff_s=(0.1, 0.2), max_unacked=3,
        ack_timeout_s=None,
    )  # fmt: skip
    try:
        broker.kill()
        threading.Timer(1.5, broker.restart).start()
        started = time.monotonic()
        sink.write([Output("a", {"i": i}) for i in range(5)])  # the 4th waits for room until the restart
        sink.flush()
        assert time.monotonic() - started >= 1.4
        assert sink.counters()["acked"] == 5 and sink.counters()["unacked"] == 0
    finally:
        sink.close()


def test_dead_letters_as_json(mqtt_broker, prefix) -> None:
    binary = b"\xff\x00\x80binary"
    with Subscriber(mqtt_broker, f"{prefix}/deadletters/#", 2) as sub:
        topic = f"{prefix}/deadletters/{{stream}}"
        letters = MqttDeadLetters(mqtt_broker.address, topic, prefix, connect_timeout_s=10)
        try:
            letters.write(DeadLetter(binary, "not valid json", "dev1", "sensors/dev1", 0, 7, ts=1700000000.5))
            letters.write(DeadLetter(b'{"x": [1, 2]}', "missing key"))
            letters.flush()
        finally:
            letters.close()
        (t1, d1), (t2, d2) = sub.messages()
    assert t1 == f"{prefix}/deadletters/dev1" and t2 == f"{prefix}/deadletters/unknown"
    assert d1 == {
        "reason": "not valid json",
        "key": "dev1",
        "topic": "sensors/dev1",
        "partition": 0,
        "position": 7,
        "ts": 1700000000.5,
        "raw": {"base64": base64.b64encode(binary).decode()},
    }
    assert d2["raw"] == '{"x": [1, 2]}' and d2["key"] is None and d2["reason"] == "missing key"
