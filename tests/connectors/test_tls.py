"""``rnnstream run`` over TLS against the session brokers' TLS listeners (``rnnstream.kafka_broker``:
SASL_SSL with SASL/PLAIN; ``rnnstream.mqtt_broker``: TLS with a username and password), for both Kafka
client libraries and for MQTT; the password comes from ``${env:...}`` or ``${file:...}`` and is never
logged. A wrong CA or a wrong password ends the service at once with an error naming the cause."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from rnnstream.local_tls import make_tls_files
from tests.rnnstream.test_service import Service, _publish, _subscribe, _wait_subscribed, write_config

pytestmark = [pytest.mark.integration]
ENV = "RNNSTREAM_TEST_BROKER_PASSWORD"
FAIL_FAST_S = 25.0
"""A refused handshake or login must end the service sooner than any client timeout (librdkafka's metadata
timeout: 30 s; paho's connect timeout here: 30 s), start-up included."""


def _sasl_ssl(library: str, cluster, password: str, ca_file) -> dict[str, str]:
    """``kafka.client`` for the cluster's SASL_SSL listener, in ``library``'s names."""
    if library == "kafka-python":
        return {
            "security_protocol": "SASL_SSL",
            "ssl_cafile": str(ca_file),
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": cluster.username,
            "sasl_plain_password": password,
        }
    return {
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": str(ca_file),
        "sasl.mechanism": "PLAIN",
        "sasl.username": cluster.username,
        "sasl.password": password,
    }


def _cause(log: str) -> str:
    """What the service said after "cannot start:", its lines joined (rich wraps them)."""
    _, found, rest = log.partition("cannot start:")
    assert found, f"no 'cannot start:' line in the log:\n{log[-3000:]}"
    return " ".join(rest.split())


# ---- Kafka ---------------------------------------------------------------------------------------------
@pytest.mark.kafka
def test_kafka_service_over_sasl_ssl(service, kafka_cluster, kafka_helpers, monkeypatch):
    h = kafka_helpers
    password = kafka_cluster.tls.password()
    monkeypatch.setenv(ENV, password)  # the service process inherits it
    client = _sasl_ssl(service.library, kafka_cluster, f"${{env:{ENV}}}", kafka_cluster.tls.ca_file)
    service.extra = {"kafka": {"bootstrap_servers": kafka_cluster.tls_bootstrap, "client": client}}
    events = h.random_events(np.random.default_rng(1), streams=12, events=300, features=3)
    messages = [(s.encode(), json.dumps({"x": x.tolist()}).encode()) for s, x in events]
    h.produce(service.bootstrap, service.topic, messages)  # the test's own clients use plaintext
    service.start()
    records = service.consume(service.outputs_topic, len(events))
    assert service.terminate() == 0, service.log()
    by_stream, answered = h.outputs_by_stream(records)
    assert len(records) == len(events) and set(answered.values()) == {1}
    expected = h.offline_outputs(service.model, events)
    assert set(by_stream) == set(expected)
    for sid, docs in by_stream.items():
        got = np.concatenate([np.asarray(d["y"], np.float32) for d in docs])
        np.testing.assert_allclose(got, expected[sid], atol=1e-5, err_msg=sid)
    assert kafka_cluster.tls_bootstrap in service.config_path("0").read_text()
    assert password not in service.log()


@pytest.mark.kafka
@pytest.mark.parametrize("wrong", ["ca", "password"])
def test_kafka_wrong_ca_or_password_fails_at_once_naming_the_cause(service, kafka_cluster, tmp_path, wrong):
    other_ca = make_tls_files(tmp_path / "other-ca").ca_file
    ca_file = other_ca if wrong == "ca" else kafka_cluster.tls.ca_file
    password_file = kafka_cluster.password_file
    if wrong == "password":
        password_file = tmp_path / "wrong-password"
        password_file.write_text("not-the-password\n")
    client = _sasl_ssl(service.library, kafka_cluster, f"${{file:{password_file}}}", ca_file)
    service.extra = {"kafka": {"bootstrap_servers": kafka_cluster.tls_bootstrap, "client": client}}
    started = time.monotonic()
    proc = service.start()
    assert proc.wait(FAIL_FAST_S) == 1, service.log()
    assert time.monotonic() - started < FAIL_FAST_S
    want = "certificate verify failed" if wrong == "ca" else "Authentication failed"
    assert want in _cause(service.log()) and kafka_cluster.tls_bootstrap in _cause(service.log())


# ---- MQTT ----------------------------------------------------------------------------------------------
def _mqtt_tls(broker, password_ref: str, ca_file, name: str) -> dict:
    """The ``mqtt`` section for the broker's TLS listener."""
    return {
        "broker": broker.tls_address,
        "client_id": f"{name}-{time.monotonic_ns()}",
        "username": broker.username,
        "password": password_ref,
        "tls": {"ca_file": str(ca_file)},
    }


@pytest.mark.mqtt
def test_mqtt_service_over_tls_with_a_password(tmp_path, mqtt_broker):
    mqtt = _mqtt_tls(mqtt_broker, f"${{file:{mqtt_broker.password_file}}}", mqtt_broker.tls.ca_file, "tls")
    dead = {"type": "file", "path": str(tmp_path / "dlq.jsonl")}
    config = write_config(tmp_path, "sensors-mqtt.yaml", mqtt=mqtt, dead_letters=dead)
    svc = Service(config, "--log-level", "DEBUG")
    n = 40
    try:
        _wait_subscribed(mqtt_broker, svc)
        sub = _subscribe(mqtt_broker, "scores/+", 2 * n)  # an independent client on the plaintext listener
        time.sleep(0.5)
        for dev in ("dev1", "dev2"):
            docs = [{"ts": 1_700_000_000 + t, "value": float(np.sin(t / 5))} for t in range(n)]
            _publish(mqtt_broker, f"sensors/{dev}", docs)
        out, _ = sub.communicate(timeout=90)
    finally:
        assert svc.stop() == 0, svc.log()
    per: dict[str, list[int]] = {}
    for line in out.splitlines():
        topic, payload = line.split(" ", 1)
        per.setdefault(topic, []).append(json.loads(payload)["ts"])
    want = [1_700_000_000 + t for t in range(n)]
    assert per == {"scores/dev1": want, "scores/dev2": want}, svc.log()
    log = svc.err.read_text(errors="replace") + svc.out.read_text(errors="replace")
    assert mqtt_broker.tls_address in config.read_text() and mqtt_broker.tls.password() not in log


@pytest.mark.mqtt
@pytest.mark.parametrize("wrong", ["ca", "password"])
def test_mqtt_wrong_ca_or_password_fails_at_once_naming_the_cause(tmp_path, mqtt_broker, monkeypatch, wrong):
    other_ca = make_tls_files(tmp_path / "other-ca").ca_file
    monkeypatch.setenv(ENV, "not-the-password" if wrong == "password" else mqtt_broker.tls.password())
    ca_file = other_ca if wrong == "ca" else mqtt_broker.tls.ca_file
    config = write_config(
        tmp_path, "sensors-mqtt.yaml", mqtt=_mqtt_tls(mqtt_broker, f"${{env:{ENV}}}", ca_file, "wrong")
    )
    started = time.monotonic()
    svc = Service(config)
    try:
        assert svc.wait(FAIL_FAST_S) == 1, svc.log()
    finally:
        if svc.alive():
            svc.kill()
    assert time.monotonic() - started < FAIL_FAST_S
    said = _cause(svc.out.read_text(errors="replace") + svc.log())  # rich's console writes to stdout
    want = "certificate verify failed" if wrong == "ca" else "Not authorized"
    assert want in said and mqtt_broker.tls_address in said
