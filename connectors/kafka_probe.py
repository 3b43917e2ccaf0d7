"""Reach the Kafka brokers once, before the service's clients start, so that a wrong CA, a certificate that
does not name the host, a plaintext port or a wrong password fails at once with librdkafka's own words for
it. Without this, librdkafka retries such errors until a metadata timeout ("Broker transport failure", 30
s later) and kafka-python reports an unrelated "IncompatibleBrokerVersion".

One librdkafka admin client serves both libraries: kafka-python's connection settings are translated with
``librdkafka_settings``, as its changelog reader already does."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from connectors.kafka_confluent import librdkafka_settings

FATAL = frozenset({KafkaError._SSL, KafkaError._AUTHENTICATION})
"""Errors no retry can cure: a failed TLS handshake, a refused SASL authentication."""
POLL_S = 0.5
"""How long one metadata request may wait before the reported errors are looked at (seconds)."""


class KafkaUnreachable(ConnectionError):
    """The brokers refused us (TLS, authentication) or did not answer; the message says which."""


def probe(library: str, bootstrap: str, client: dict[str, Any], timeout_s: float = 30.0) -> None:
    """Fetch the cluster's metadata with ``client`` (the ``kafka.client`` settings, secrets as text, in
    ``library``'s names). Raises ``KafkaUnreachable`` naming the brokers and the cause: at once for a TLS or
    authentication error, after ``timeout_s`` seconds when no broker answers."""
    if library == "kafka-python":
        settings = librdkafka_settings(bootstrap, client)
    else:
        settings = {"bootstrap.servers": bootstrap, **client}
    errors: list[KafkaError] = []
    admin = AdminClient({**settings, "error_cb": errors.append})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=POLL_S)
            return
        except KafkaException as exc:
            last = exc.args[0].str() if exc.args else str(exc)
        admin.poll(0)  # serves error_cb
        fatal = [e for e in errors if e.code() in FATAL]
        if fatal:
            raise KafkaUnreachable(f"Kafka {bootstrap}: {fatal[0].str()}")
        if time.monotonic() > deadline:
            seen = "; ".join(dict.fromkeys(e.str() for e in errors)) or last
            raise KafkaUnreachable(f"Kafka {bootstrap}: no broker answered within {timeout_s:g} s ({seen})")
