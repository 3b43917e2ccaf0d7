"""Integration tests for rnnstream.kafka_broker (real KRaft brokers, real kafka-python clients).

Needs Java 17+ and Maven (or an already populated jar cache) plus kafka-python.  Outside CI they
are skipped when those are missing; with CI=true a missing prerequisite is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import time
import uuid
from pathlib import Path

import pytest

from rnnstream import kafka_broker as kb

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

IN_CI = os.environ.get("CI") == "true"


def _missing_prerequisite(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: Kafka integration tests must not be skipped)")
    pytest.skip(reason)


def _jars_cached() -> bool:
    return (kb.kafka_home() / "lib" / ".complete").is_file()


@pytest.fixture(scope="module", autouse=True)
def prerequisites() -> None:
    """Skip (or fail under CI=true) when java, maven/jar cache or kafka-python are missing."""
    if shutil.which("java") is None:
        _missing_prerequisite("java not found on PATH; the local Kafka broker needs a JDK 17+")
    if shutil.which("mvn") is None and not _jars_cached():
        _missing_prerequisite(f"mvn not found on PATH and no Kafka jar cache at {kb.kafka_home()}")
    try:
        import kafka  # noqa: F401
    except ImportError:
        _missing_prerequisite("kafka-python is not installed (pip install kafka-python)")
    kb.ensure_jars()


def _topic() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _create_topic(bootstrap: str, topic: str, partitions: int, rf: int) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=rf)])
        # Creation completes on the controller first; the brokers learn of it through metadata updates.
        deadline = time.monotonic() + 30
        while topic not in admin.list_topics() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert topic in admin.list_topics()
    finally:
        admin.close()


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=10)
    try:
        for v in values:
            producer.send(topic, value=v)
        producer.flush(timeout=30)
    finally:
        producer.close()


def _consume(bootstrap: str, topic: str, expected: int, group: str) -> list[bytes]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=30000,
    )
    try:
        values = []
        for msg in consumer:
            values.append(msg.value)
            if len(values) >= expected:
                break
        consumer.commit()
        return values
    finally:
        consumer.close()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_single_broker_produce_consume_stop(tmp_path: Path) -> None:
    cluster = kb.start_cluster(1, base_dir=tmp_path / "k1")
    try:
        assert cluster.bootstrap.startswith("127.0.0.1:")
        assert cluster.is_running()
        assert "Kafka Server started" in cluster.log_files[0].read_text()
        topic = _topic()
        _create_topic(cluster.bootstrap, topic, partitions=2, rf=1)
        values = [f"msg-{i}".encode() for i in range(20)]
        _produce(cluster.bootstrap, topic, values)
        assert sorted(_consume(cluster.bootstrap, topic, len(values), "g-single")) == sorted(values)
    finally:
        cluster.stop()
    assert all(_gone(pid) for pid in cluster.pids)
    assert cluster.alive() == [False]
    assert cluster.log_files[0].is_file()  # logs are kept under base_dir


def test_three_brokers_survive_one_kill(tmp_path: Path) -> None:
    with kb.start_cluster(3, base_dir=tmp_path / "k3") as cluster:
        assert len(cluster.bootstrap.split(",")) == 3
        topic = _topic()
        _create_topic(cluster.bootstrap, topic, partitions=3, rf=3)
        before = [f"before-{i}".encode() for i in range(30)]
        _produce(cluster.bootstrap, topic, before)
        # consume + commit first so the group's offsets (RF 3) exist before the failure
        assert sorted(_consume(cluster.bootstrap, topic, len(before), "g-three")) == sorted(before)
        cluster.kill_broker(0)
        assert cluster.alive() == [False, True, True]
        live_bootstrap = ",".join(cluster.bootstrap.split(",")[1:])
        after = [f"after-{i}".encode() for i in range(10)]
        _produce(live_bootstrap, topic, after)
        # same group resumes from its committed offsets on the two surviving brokers
        assert sorted(_consume(live_bootstrap, topic, len(after), "g-three")) == sorted(after)
    assert all(_gone(pid) for pid in cluster.pids)


def test_up_status_down_across_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RNNSTREAM_KAFKA_RUN_DIR", str(tmp_path / "run"))
    assert kb.status() is None
    first = kb.up()
    try:
        assert kb.state_file().is_file()
        again = kb.up()  # already running: same cluster, nothing new started
        assert again.bootstrap == first.bootstrap and again.pids == first.pids
        current = kb.status()
        assert current is not None and current.bootstrap == first.bootstrap
        assert current.tls_bootstrap == first.tls_bootstrap and current.password_file == first.password_file
    finally:
        stopped = kb.down()
    assert stopped
    assert not kb.state_file().exists()
    assert kb.status() is None
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in first.pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in first.pids)
    assert kb.down() is False


def _tls_handshake(port: int, ca_file: Path) -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:``port`` that trusts only ``ca_file`` and checks the host name."""
    context = ssl.create_default_context(cafile=str(ca_file))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def test_sasl_ssl_listener_needs_the_ca_and_the_password(kafka_cluster, tmp_path: Path) -> None:
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.errors import KafkaError

    from rnnstream.local_tls import make_tls_files

    tls = kafka_cluster.tls
    port = int(kafka_cluster.tls_bootstrap.rpartition(":")[2])
    with _tls_handshake(port, tls.ca_file) as conn:  # the certificate chains to the CA and names the host
        assert conn.version() is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(port, make_tls_files(tmp_path / "other").ca_file)
    settings = {
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(tls.ca_file),
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": kafka_cluster.username,
    }
    topic = _topic()
    _create_topic(kafka_cluster.bootstrap, topic, partitions=1, rf=1)
    producer = KafkaProducer(
        bootstrap_servers=kafka_cluster.tls_bootstrap,
        acks="all",
        sasl_plain_password=tls.password(),
        **settings,
    )
    values = [f"tls-{i}".encode() for i in range(10)]
    for v in values:
        producer.send(topic, value=v)
    producer.flush(timeout=30)
    producer.close()
    assert sorted(_consume(kafka_cluster.bootstrap, topic, len(values), "g-tls")) == values  # in over TLS
    with pytest.raises(KafkaError):
        KafkaAdminClient(
            bootstrap_servers=kafka_cluster.tls_bootstrap, sasl_plain_password="nope", **settings
        )
    assert tls.password() not in kafka_cluster.log_files[0].read_text(errors="replace")
