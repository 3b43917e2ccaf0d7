"""``KafkaClient`` on confluent-kafka (librdkafka): the same service semantics as the kafka-python client,
several times the throughput. Settings under ``client``/``consumer``/``producer`` use librdkafka's names
(``security.protocol``, ``sasl.mechanism``, ``linger.ms``, ...).

Rebalance callbacks run inside ``poll`` on the service's own thread, so they may block.

Rebalances are incremental (``partition.assignment.strategy: cooperative-sticky`` by default; set
``range``/``roundrobin`` under ``consumer`` for the eager protocol, which every member of a group must then
use): a rebalance revokes only the partitions that move, so the service keeps serving the others with their
streams in memory and restores only what it gains. librdkafka calls the callbacks with the partitions added
or revoked (possibly none), and fences offset commits with the consumer's group metadata (KIP-447).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from connectors.kafka import (
    ClientSettings,
    PartitionCallback,
    Record,
    StreamId,
    TransactionFailed,
    apply_changelog_record,
    input_width,
)

log = logging.getLogger(__name__)


class ConfluentKafkaClient:
    """Group consumer (static membership, read_committed, manual commits) + transactional producer."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.base = {"bootstrap.servers": settings.bootstrap, **settings.client}
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self._assigned: set[tuple[str, int]] = set()

    def ensure_topics(self, inputs: list[str], others: list[str], changelog: str) -> int:
        admin = AdminClient(self.base)
        meta = admin.list_topics(timeout=30).topics

        def count(topic: str) -> int | None:
            t = meta.get(topic)
            return len(t.partitions) if t is not None and t.error is None and t.partitions else None

        counts = [count(t) for t in inputs]
        width = input_width(inputs, counts)
        new = [NewTopic(t, width) for t, n in zip(inputs, counts, strict=True) if n is None]
        new += [NewTopic(t, width) for t in others if count(t) is None]
        have = count(changelog)
        if have is None:
            new.append(NewTopic(changelog, width, config={"cleanup.policy": "compact"}))
        elif have < width:
            raise ValueError(f"changelog topic {changelog} has {have} partitions, inputs need {width}")
        for topic, future in admin.create_topics(new).items() if new else []:
            try:
                future.result(30)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                log.debug("topic %s was created concurrently", topic)
        return width

    def start(
        self,
        topics: list[str],
        on_assigned: PartitionCallback,
        on_revoked: PartitionCallback,
        on_lost: PartitionCallback | None = None,
    ) -> None:
        self.producer = self._transactional_producer()
        self.consumer = Consumer(
            {
                **self.base,
                "group.id": self.settings.group_id,
                "group.instance.id": self.settings.member_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "partition.assignment.strategy": "cooperative-sticky",
                **self.settings.consumer,
            }
        )

        def assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            # eager: the whole assignment after a revocation of everything; cooperative: the added ones
            self._assigned |= {(tp.topic, tp.partition) for tp in partitions}
            on_assigned(sorted({tp.partition for tp in partitions}))

        def leaving(callback: PartitionCallback) -> Callable[[Consumer, list[TopicPartition]], None]:
            def leave(consumer: Consumer, partitions: list[TopicPartition]) -> None:
                self._assigned -= {(tp.topic, tp.partition) for tp in partitions}  # a rollback keeps the rest
                callback(sorted({tp.partition for tp in partitions}))

            return leave

        self.consumer.subscribe(
            topics, on_assign=assign, on_revoke=leaving(on_revoked), on_lost=leaving(on_lost or on_revoked)
        )

    def _transactional_producer(self) -> Producer:
        """A producer with this process's transactional id, inside a new transaction. Its
        ``init_transactions`` aborts a transaction the id left open and fences its older producers."""
        producer = Producer(
            {
                **self.base,
                "transactional.id": self.settings.member_id,
                "transaction.timeout.ms": self.settings.transaction_timeout_ms,
                "linger.ms": 2,
                # A new transaction's first AddPartitionsToTxn/AddOffsetsToTxn often meets the previous
                # one's markers still being written (CONCURRENT_TRANSACTIONS) and is retried after this
                # backoff; librdkafka's default of 100 ms made one checkpoint in ten take ~110 ms.
                "retry.backoff.ms": 10,
                **self.settings.producer,
            }
        )
        producer.init_transactions(30)
        producer.begin_transaction()
        return producer

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        """Up to ``max_records`` records; waits at most ``timeout_s`` for the first one, none for the rest.
        (``consume(n, timeout)`` alone waits for ``n`` records or the whole timeout, which adds up to
        ``timeout_s`` of latency to every record when fewer than ``n`` arrive.) Records of partitions not
        assigned (any more) are dropped, as the kafka-python client does."""
        messages = self.consumer.consume(max_records, 0)
        if not messages:
            first = self.consumer.poll(timeout_s)
            if first is None:
                return []
            messages = [first, *self.consumer.consume(max_records - 1, 0)] if max_records > 1 else [first]
        records = []
        assigned = self._assigned
        for m in messages:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                log.warning("consumer: %s", err)
                continue
            if (m.topic(), m.partition()) not in assigned:
                # fetched before its partition was lost or revoked (the process stalled past its session):
                # another process owns it now, and the rejoin reads it from the committed offset again
                continue
            records.append(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value()))
        return records

    def send(self, topic, key, value, headers=None, partition=None) -> None:
        kwargs: dict[str, Any] = {"key": key, "value": value}
        if headers:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self.producer.produce(topic, **kwargs)
                return
            except BufferError:  # the local queue is full: wait for deliveries (backpressure)
                self.producer.poll(0.05)

    def send_many(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        produce = self.producer.produce
        for key, value in messages:
            try:
                produce(topic, value, key)
            except BufferError:
                self.send(topic, key, value)
        self.producer.poll(0)  # serve delivery reports

    def settle(self) -> None:
        """Nothing to wait for: ``commit`` is synchronous."""

    def send_to_partitions(self, topic: str, rows: Mapping[int, list[tuple[bytes, bytes | None]]]) -> None:
        produce = self.producer.produce
        for partition, pairs in rows.items():
            for key, value in pairs:
                try:
                    produce(topic, value, key, partition)
                except BufferError:
                    self.send(topic, key, value, partition=partition)
        self.producer.poll(0)

    def commit(self, next_offsets: dict[tuple[str, int], int], wait: bool = True) -> None:
        """Synchronous whatever ``wait`` says (librdkafka's commit blocks)."""
        try:
            if next_offsets:
                offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), 30
                )
            self.producer.commit_transaction(60)
        except KafkaException as exc:
            raise TransactionFailed(str(exc)) from exc
        self.producer.begin_transaction()

    def abort(self) -> None:
        try:
            self.producer.abort_transaction(30)
        except KafkaException as exc:  # a fatal error (fenced, timed out while the process stalled)
            log.warning("abort failed (%s): replacing the producer, which aborts its transaction", exc)
            self.producer = self._transactional_producer()
            return
        self.producer.begin_transaction()

    def rewind_to_committed(self) -> None:
        tps = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        for tp in self.consumer.committed(tps, timeout=30) if tps else []:
            self.consumer.seek(
                TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            )

    def assigned_partitions(self) -> list[int]:
        return sorted({p for _, p in self._assigned})

    def read_changelog(self, topic: str, partitions: Iterable[int]) -> dict[int, dict[StreamId, bytes]]:
        return read_changelog(self.base, f"{self.settings.group_id}-restore", topic, partitions)

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
        if self.producer is not None:
            try:
                self.producer.abort_transaction(10)
            except KafkaException:
                log.debug("no transaction to abort")
            self.producer.flush(10)


def read_changelog(
    settings: dict[str, Any], group_prefix: str, topic: str, partitions: Iterable[int], timeout_s: float = 60
) -> dict[int, dict[StreamId, bytes]]:
    """Committed state per changelog partition (``KafkaClient.read_changelog``), read with a librdkafka
    consumer up to each partition's last stable offset. ``settings``: librdkafka connection settings."""
    partitions = list(partitions)
    states: dict[int, dict[StreamId, bytes]] = {p: {} for p in partitions}
    if not partitions:
        return states
    reader = Consumer(
        {
            **settings,
            "group.id": f"{group_prefix}-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,  # EOF comes at the last stable offset under read_committed
        }
    )
    deadline = time.monotonic() + timeout_s
    try:
        _wait_for_completed_transactions(settings, topic, partitions, deadline)
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        pending = set(partitions)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"changelog {topic}: restore did not reach the end in {timeout_s} s")
            for m in reader.consume(10_000, 0.2):
                err = m.error()
                if err is None:
                    apply_changelog_record(states[m.partition()], m.key(), m.value())
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(m.partition())
                else:
                    raise KafkaException(err)
    finally:
        reader.close()
    return states


def _wait_for_completed_transactions(
    settings: dict[str, Any], topic: str, partitions: list[int], deadline: float
) -> None:
    """Wait until each partition's last stable offset reaches its high watermark.

    A transaction's commit returns before its markers are written; until the marker lands, reading
    under read_committed stops (EOF) before that transaction's records, so a restore right after a
    commit (the previous owner's, or this process's own before a rebalance) would load the state from
    before it while the consumed offsets, fetched stable, already include it. Only a partition's owner
    writes its changelog, and nothing is written to it before its restore, so once the two offsets meet
    every transaction that wrote there is complete (a fenced or crashed producer's open one is aborted by
    the coordinator, at the latest after the transaction timeout)."""
    admin = AdminClient(settings)
    tps = [TopicPartition(topic, p) for p in partitions]

    def ends(level: IsolationLevel) -> dict[int, int]:
        specs = {tp: OffsetSpec.latest() for tp in tps}
        futures = admin.list_offsets(specs, isolation_level=level, request_timeout=30)
        return {tp.partition: f.result().offset for tp, f in futures.items()}

    while True:
        try:
            stable, high = ends(IsolationLevel.READ_COMMITTED), ends(IsolationLevel.READ_UNCOMMITTED)
        except KafkaException as exc:  # a changelog just created has no leader yet, for one
            if not _retriable(exc.args[0]) or time.monotonic() > deadline:
                raise
            stable, high = {}, {None: exc}
        if stable == high:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"changelog {topic}: transactions still open on {stable} < {high}")
        time.sleep(0.05)


_NOT_READY = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
}


def _retriable(error: KafkaError) -> bool:
    """Worth asking again: flagged so, or a partition whose leader is not known yet (a new topic)."""
    return error.retriable() or error.code() in _NOT_READY


# kafka-python setting names → librdkafka's, for the connection settings both libraries share.
KAFKA_PYTHON_TO_LIBRDKAFKA = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "client_id": "client.id",
}


def librdkafka_settings(bootstrap: str, kafka_python_settings: dict[str, Any]) -> dict[str, Any]:
    """Connection settings given in kafka-python's names, in librdkafka's (unknown ones are refused)."""
    unknown = set(kafka_python_settings) - set(KAFKA_PYTHON_TO_LIBRDKAFKA)
    if unknown:
        raise ValueError(f"cannot translate kafka-python settings {sorted(unknown)} for the changelog reader")
    return {"bootstrap.servers": bootstrap} | {
        KAFKA_PYTHON_TO_LIBRDKAFKA[k]: v for k, v in kafka_python_settings.items()
    }
