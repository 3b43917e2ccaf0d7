"""Integration tests for rnnstream.mqtt_broker (a real Mosquitto, real independent clients).

Needs ``mosquitto`` and ``mosquitto-clients`` (``scripts/system_deps.sh``) and paho-mqtt.  Outside CI
they are skipped when those are missing; with CI=true a missing prerequisite is a failure.

``mosquitto_pub`` is run once per message: with ``-l`` and QoS 1 the 2.0.11 client sends DISCONNECT
when stdin ends, before its queued messages are out (20k lines in, ~18k delivered, exit status 0).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from rnnstream import mqtt_broker as mb
from rnnstream.mqtt_broker import Broker

pytestmark = [pytest.mark.integration, pytest.mark.mqtt]

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parents[2]
PAYLOAD = "payload="
"""Prefix of payload lines in mosquitto_sub output (``-F payload=%p``)."""


@pytest.fixture(scope="module", autouse=True)
def prerequisites() -> None:
    """Skip (or fail under CI=true) when the broker, its clients or paho-mqtt are missing."""
    missing = []
    try:
        mb.mosquitto_binary()
    except mb.MqttBrokerError as exc:
        missing.append(str(exc))
    missing += [
        f"'{tool}' not found on PATH"
        for tool in ("mosquitto_pub", "mosquitto_sub", "stdbuf")
        if not shutil.which(tool)
    ]
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        missing.append("paho-mqtt is not installed")
    if missing and IN_CI:
        pytest.fail("; ".join(missing) + " (CI=true: MQTT integration tests must not be skipped)")
    if missing:
        pytest.skip("; ".join(missing))


# --------------------------------------------------------------------------- helpers


def _topic() -> str:
    return f"t/{uuid.uuid4().hex[:8]}"


def _publish(broker: Broker, topic: str, payloads: list[str], qos: int = 1) -> None:
    """Publish with ``mosquitto_pub``, one process (connect, publish, PUBACK, disconnect) per message."""
    for payload in payloads:
        cmd = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", str(qos), "-t", topic]
        subprocess.run([*cmd, "-m", payload], check=True, timeout=10, capture_output=True)


def _start_sub(broker: Broker, topic: str, count: int) -> subprocess.Popen[str]:
    """``mosquitto_sub -C count`` on ``topic``; returns once its SUBACK arrived (``-d`` output).

    ``stdbuf -oL``: into a pipe its stdout is block-buffered, so "received SUBACK" would only show at exit.
    """
    cmd = [
        "stdbuf",
        "-oL",
        "mosquitto_sub",
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "-q",
        "1",
        "-t",
        topic,
    ]
    proc = subprocess.Popen(
        [*cmd, "-C", str(count), "-W", "30", "-d", "-F", f"{PAYLOAD}%p"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "received SUBACK" in line:
            return proc
    proc.communicate()
    raise AssertionError(f"mosquitto_sub exited before subscribing (rc {proc.returncode})")


def _payloads(proc: subprocess.Popen[str]) -> list[str]:
    """Message payloads printed by :func:`_start_sub` (the other lines are ``-d`` debug output)."""
    out, _ = proc.communicate(timeout=40)
    return [line.removeprefix(PAYLOAD) for line in out.splitlines() if line.startswith(PAYLOAD)]


class Subscriber:
    """A paho-mqtt 2.x client with a persistent session (fixed client id, no clean start)."""

    def __init__(self, broker: Broker, client_id: str, protocol: str) -> None:
        import paho.mqtt.client as mqtt

        self.broker = broker
        self.protocol = protocol
        v5 = protocol == "v5"
        kwargs: dict[str, Any] = {} if v5 else {"clean_session": False}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            **kwargs,
        )
        self.messages: list[bytes] = []
        self.session_present: bool | None = None
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.append(msg.payload)

    def _on_connect(self, _client: Any, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        assert not reason.is_failure, reason
        self.session_present = flags.session_present
        self._connected.set()

    def connect(self) -> None:
        """Connect without a clean start (v5: SessionExpiryInterval 1 h) and wait for CONNACK."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._connected.clear()
        if self.protocol == "v5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            self.client.connect(self.broker.host, self.broker.port, clean_start=False, properties=props)
        else:
            self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        assert self._connected.wait(10), "no CONNACK within 10 s"

    def subscribe(self, topic: str) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK."""
        done = threading.Event()
        self.client.on_subscribe = lambda *_args: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(10), "no SUBACK within 10 s"

    def disconnect(self) -> None:
        """Send DISCONNECT and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, count: int, timeout: float = 30.0, idle: float = 5.0) -> list[bytes]:
        """Wait for ``count`` messages, at most ``timeout`` s and ``idle`` s without one; return them."""
        deadline = time.monotonic() + timeout
        seen, last_new = 0, time.monotonic()
        while len(self.messages) < count and time.monotonic() < min(deadline, last_new + idle):
            if len(self.messages) > seen:
                seen, last_new = len(self.messages), time.monotonic()
            time.sleep(0.02)
        time.sleep(0.2)  # anything beyond ``count`` (duplicates) shows up too
        return list(self.messages)


def _wait_for_log(broker: Broker, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in broker.log_file.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {broker.log_file} within {timeout} s"
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"


# --------------------------------------------------------------------------- tests


def test_round_trip_with_mosquitto_clients(mqtt_broker: Broker) -> None:
    assert mqtt_broker.alive()
    assert mqtt_broker.address == f"127.0.0.1:{mqtt_broker.port}"
    topic = _topic()
    sent = [f"msg-{i}" for i in range(20)]
    sub = _start_sub(mqtt_broker, topic, len(sent))
    _publish(mqtt_broker, topic, sent)
    assert _payloads(sub) == sent
    assert sub.returncode == 0


def test_config_has_persistence_and_no_queue_limits(mqtt_broker: Broker) -> None:
    lines = mqtt_broker.config.read_text().splitlines()
    for line in (
        f"listener {mqtt_broker.port} 127.0.0.1",
        "persistence true",
        "autosave_interval 1",
        "max_queued_messages 0",
        "max_queued_bytes 0",
        "max_inflight_messages 0",
    ):
        assert line in lines
    assert f"persistence_location {mqtt_broker.data_dir}/" in lines
    assert "running" in mqtt_broker.log_file.read_text()  # the broker can write its log (user option)


def test_kill_and_restart_on_the_same_port(fresh_mqtt_broker: Broker) -> None:
    broker = fresh_mqtt_broker
    sub = _start_sub(broker, _topic(), 1)  # an open connection at kill time: TIME_WAIT on the broker's port
    old_pid = broker.pid
    broker.kill()
    assert not broker.alive() and _gone(old_pid)
    sub.kill()  # it would reconnect to the restarted broker
    sub.communicate(timeout=10)
    broker.restart()
    assert broker.alive() and broker.pid != old_pid
    topic = _topic()
    sub = _start_sub(broker, topic, 1)
    _publish(broker, topic, ["after-restart"])
    assert _payloads(sub) == ["after-restart"]


def test_start_broker_rejects_a_taken_port(fresh_mqtt_broker: Broker, tmp_path: Path) -> None:
    with pytest.raises(mb.MqttBrokerError, match="Address already in use"):
        mb.start_broker(tmp_path / "second", port=fresh_mqtt_broker.port, timeout=2.0)


@pytest.mark.parametrize("protocol", ["v5", "v311"])
def test_persistent_session_survives_kill_9(fresh_mqtt_broker: Broker, protocol: str) -> None:
    broker = fresh_mqtt_broker
    client_id = f"sub-{protocol}-{uuid.uuid4().hex[:6]}"
    sub = Subscriber(broker, client_id, protocol)
    sub.connect()
    assert sub.session_present is False
    sub.subscribe("t/#")
    sub.disconnect()
    _wait_for_log(broker, f"Client {client_id} disconnected")
    broker.wait_for_autosave()  # the session as it is now, on disk (autosaves are ~2 s apart)

    broker.kill()
    broker.restart()
    sent = [f"m{i}" for i in range(100)]
    _publish(broker, "t/x", sent)  # the subscriber is offline: the broker queues for its session

    sub = Subscriber(broker, client_id, protocol)
    sub.connect()
    try:
        assert sub.session_present is True
        assert [m.decode() for m in sub.wait_for(len(sent))] == sent
    finally:
        sub.disconnect()


@pytest.mark.slow
def test_offline_session_keeps_100k_messages_across_kill_9(fresh_mqtt_broker: Broker) -> None:
    """``max_queued_messages`` defaults to 1000; ours keeps all 100k (and they survive a kill -9)."""
    import paho.mqtt.client as mqtt

    broker, n = fresh_mqtt_broker, 100_000
    sub = Subscriber(broker, "sub-100k", "v311")
    sub.connect()
    sub.subscribe("t/#")
    sub.disconnect()
    _wait_for_log(broker, "Client sub-100k disconnected")

    acked = 0

    def on_publish(*_args: Any) -> None:
        nonlocal acked
        acked += 1

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub-100k", protocol=mqtt.MQTTv311)
    pub.on_publish = on_publish
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    for i in range(n):
        pub.publish("t/x", f"m{i}".encode(), qos=1)
        while i - acked > 1000:  # paho's message ids wrap at 65535: keep the backlog small
            time.sleep(0.001)
    deadline = time.monotonic() + 60
    while acked < n and time.monotonic() < deadline:
        time.sleep(0.02)
    pub.disconnect()
    pub.loop_stop()
    assert acked == n

    broker.wait_for_autosave(timeout=30)
    broker.kill()
    broker.restart(timeout=60)
    sub = Subscriber(broker, "sub-100k", "v311")
    sub.connect()
    try:
        got = sub.wait_for(n, timeout=120)
        assert len(got) == n and len(set(got)) == n
    finally:
        sub.disconnect()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rnnstream.cli", "mqtt", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_cli_up_status_down(tmp_path: Path) -> None:
    env = {**os.environ, "RNNSTREAM_MQTT_RUN_DIR": str(tmp_path / "run"), "COLUMNS": "200"}
    state = tmp_path / "run" / "broker.json"
    assert _cli("status", env=env).returncode == 1
    up = _cli("up", env=env)
    assert up.returncode == 0, up.stderr
    address = up.stdout.strip()
    host, _, port = address.partition(":")
    assert host == "127.0.0.1" and port.isdigit()
    recorded = Broker.from_json(json.loads(state.read_text()))
    try:
        assert recorded.address == address and recorded.alive()
        again = _cli("up", env=env)  # already running: same broker
        assert again.returncode == 0 and again.stdout.strip() == address
        status = _cli("status", env=env)
        assert status.returncode == 0 and status.stdout.strip() == address
        topic = _topic()
        sub = _start_sub(recorded, topic, 1)
        _publish(recorded, topic, ["via-cli-broker"])
        assert _payloads(sub) == ["via-cli-broker"]
    finally:
        down = _cli("down", env=env)
        recorded.stop()  # in case ``down`` did not
    assert down.returncode == 0 and "stopped" in down.stdout
    assert _gone(recorded.pid)
    assert not state.exists()
    assert _cli("status", env=env).returncode == 1
    assert "no broker was running" in _cli("down", env=env).stdout


def _tls_pub(broker: Broker, topic: str, message: str, *auth: str) -> subprocess.CompletedProcess[str]:
    """``mosquitto_pub`` to the TLS listener with ``auth`` (``--cafile``, ``-u``, ``-P`` ...)."""
    cmd = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.tls_port), "-q", "1", "-t", topic]
    return subprocess.run(
        [*cmd, "-m", message, *auth], capture_output=True, text=True, timeout=20, check=False
    )


def test_tls_listener_needs_the_broker_ca_and_the_password(mqtt_broker: Broker, tmp_path: Path) -> None:
    from rnnstream.local_tls import make_tls_files

    password = mqtt_broker.tls.password()
    ca = ["--cafile", str(mqtt_broker.tls.ca_file)]
    topic = _topic()
    sub = _start_sub(mqtt_broker, topic, 1)  # the plaintext listener stays anonymous
    sent = _tls_pub(mqtt_broker, topic, "over-tls", *ca, "-u", mqtt_broker.username, "-P", password)
    assert sent.returncode == 0, sent.stderr
    assert _payloads(sub) == ["over-tls"]
    other_ca = ["--cafile", str(make_tls_files(tmp_path / "other").ca_file)]
    refused = {
        "wrong password": _tls_pub(mqtt_broker, topic, "x", *ca, "-u", mqtt_broker.username, "-P", "nope"),
        "anonymous": _tls_pub(mqtt_broker, topic, "x", *ca),
        "another CA": _tls_pub(
            mqtt_broker, topic, "x", *other_ca, "-u", mqtt_broker.username, "-P", password
        ),
    }
    assert {why: r.returncode != 0 for why, r in refused.items()} == dict.fromkeys(refused, True)
    assert password not in mqtt_broker.config.read_text()  # the config names files, not the password
    assert mqtt_broker.password_file.stat().st_mode & 0o077 == 0
