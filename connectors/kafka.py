"""Apache Kafka: the client interface the Kafka service uses, and its kafka-python implementation.

- Record key = stream id (UTF-8). Values decode with ``connectors.codec``.
- Outputs go to one topic, keyed by stream id, each naming the input ``topic/partition/offset`` it answers.
- Malformed messages go to a dead-letter topic with their original bytes and a ``reason`` header.
- Stream states go to a compacted changelog topic: partition ``p`` of the changelog holds the streams of
  input partition ``p`` (key = stream id, value = the state as raw little-endian float32; a tombstone when
  the stream ended). Changelog records, outputs and consumed offsets of one checkpoint interval commit in
  one Kafka transaction, so after any crash the committed state and the committed offsets agree.

In the pipeline (``rnnstream.pipeline``) Kafka is one source/sink pair behind the common contracts
(``connectors.base``), all sharing one transactional client: ``KafkaSource`` (exactly-once; its ``commit``
commits the transaction), ``KafkaSink`` and ``KafkaDeadLetters`` (sent inside the transaction), and
``KafkaChangelog`` (the state backend). A Kafka sink or dead-letter topic fed by another source uses a plain
idempotent producer instead (``KafkaProducer``), flushed at each checkpoint: at-least-once.

Two client libraries implement ``KafkaClient``: kafka-python (default, pure Python, here) and
confluent-kafka (librdkafka; ``connectors.kafka_confluent``), chosen by ``kafka.client_library`` in the
service config. kafka-python is used in bulk (``connectors.kafka_records``): outputs and changelog rows
are appended to its producer as whole record-batch chunks per partition (``BulkSender``) instead of one
``send`` per record, fetched batches are read in one loop per batch (``_read_in_bulk``), and CRC-32C is
compiled, not pure Python. Its transactions alternate between two producers (transactional ids
``<member id>`` and ``<member id>-1``): a checkpoint's commit goes on while the next transaction already
takes outputs (``PythonKafkaClient.commit``), one commit at a time and in order.

Guarantee under rebalances and stalls (both libraries): a transaction commits only if its offsets are
accepted by the group coordinator for the committing member's current generation (KIP-447: the offsets go
with the consumer's generation, member id and group instance id; kafka-python 2.x does not send them, so
this module adds TxnOffsetCommit v3 to it, ``_fence_offset_commits``). A process that stalls past its
session timeout (GC, SIGSTOP, a frozen VM) and wakes up after its partitions moved therefore cannot commit
outputs, changelog rows or offsets for them: the broker refuses the offsets, the transaction is aborted and
the process rolls back to the committed state. A partition taken away while the process was out of the
group is *lost*, not revoked: nothing is committed for it (``Assignment.lost``). When the stall outlasted
the transaction timeout the broker has aborted the transaction and fenced the producer; the client then
replaces its producer (the same transactional id) instead of ending the process. A new owner reads offsets
only once no transaction holds them pending, and the changelog only up to its last stable offset, so it
starts from exactly the last committed checkpoint: no event lost, none applied twice.

Rebalances: confluent-kafka rebalances incrementally (cooperative-sticky): only moved partitions are
revoked (checkpointed, dropped) and restored; the others keep serving with their streams in memory.
kafka-python 2.x has only the eager protocol (range/round-robin assignors, no cooperative support): every
rebalance revokes every partition, so each process checkpoints and reloads all its streams.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from kafka.consumer.subscription_state import ConsumerRebalanceListener

from connectors.base import (
    Assignment,
    CheckpointFailed,
    DeadLetter,
    Guarantee,
    Message,
    Output,
    json_safe,
)
from connectors.codec import Encoding, encode_document

log = logging.getLogger(__name__)

StreamId = str
PartitionCallback = Callable[[list[int]], None]
"""Called with partition numbers when partitions are assigned to / revoked from this process."""


class Record(NamedTuple):
    """One consumed message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class TransactionFailed(RuntimeError):
    """A checkpoint transaction could not commit (fenced, rebalanced away, broker trouble); the service
    aborts it and reloads the committed state."""


class KafkaClient(Protocol):
    """What the Kafka service needs from a client library: a group consumer reading committed data and
    a transactional producer whose transactions also commit the consumed offsets."""

    def ensure_topics(self, inputs: list[str], others: list[str], changelog: str) -> int:
        """Create missing topics (the changelog compacted, as wide as the widest input); returns that
        partition count."""
        ...

    def start(
        self,
        topics: list[str],
        on_assigned: PartitionCallback,
        on_revoked: PartitionCallback,
        on_lost: PartitionCallback | None = None,
    ) -> None:
        """Init transactions (fencing a crashed predecessor), begin one, subscribe to ``topics``.
        ``on_lost`` (default ``on_revoked``): partitions taken away while this process was out of the
        group, which it must not commit for."""
        ...

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        """Up to ``max_records`` records, each ``(topic, partition, offset, key, value)`` (a ``Record``
        or a plain tuple in that order)."""
        ...

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        """Produce inside the open transaction; blocks while the client's buffer is full."""
        ...

    def send_many(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        """``send`` for many ``(key, value)`` pairs (the hot path: one output per input message)."""
        ...

    def send_to_partitions(self, topic: str, rows: Mapping[int, list[tuple[bytes, bytes | None]]]) -> None:
        """``send`` for many ``(key, value)`` pairs per partition (changelog rows)."""
        ...

    def commit(self, next_offsets: dict[tuple[str, int], int], wait: bool = True) -> None:
        """Add the consumed offsets to the open transaction, commit it and begin the next one. Raises
        ``TransactionFailed``. ``wait=False`` lets the commit finish while the next transaction goes on:
        its failure is then raised by the next ``commit``."""
        ...

    def abort(self) -> None:
        """Abort the open transaction and begin a new one."""
        ...

    def settle(self) -> None:
        """Wait for a commit made with ``wait=False``; ``TransactionFailed`` if it failed."""
        ...

    def rewind_to_committed(self) -> None:
        """Seek every assigned partition to its committed offset (after an abort)."""
        ...

    def assigned_partitions(self) -> list[int]: ...

    def read_changelog(self, topic: str, partitions: Iterable[int]) -> dict[int, dict[StreamId, bytes]]:
        """Committed state rows per changelog partition, ``{p: {stream_id: row}}``: last write wins,
        tombstones remove."""
        ...

    def close(self) -> None: ...


def dead_letter_headers(reason: str, topic: str, partition: int, offset: Any) -> list[tuple[str, bytes]]:
    return [
        ("reason", reason.encode(errors="backslashreplace")),
        ("source.topic", topic.encode(errors="backslashreplace")),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(offset).encode()),
    ]


def apply_changelog_record(table: dict[StreamId, bytes], key: bytes, value: bytes | None) -> None:
    """Last write wins; a tombstone (``None``) removes the stream."""
    sid = key.decode()
    if value is None:
        table.pop(sid, None)
    else:
        table[sid] = value


@dataclass(frozen=True)
class ClientSettings:
    """Where and as whom a service connects. ``client`` goes to every client of the chosen library,
    ``consumer``/``producer`` only to that one (the library's own setting names)."""

    bootstrap: str
    group_id: str
    instance_id: str
    client: dict[str, Any] = field(default_factory=dict)
    consumer: dict[str, Any] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)
    transaction_timeout_ms: int = 10_000

    @property
    def member_id(self) -> str:
        """This process's identity in the group: its static member id and transactional id."""
        return f"{self.group_id}-{self.instance_id}"


def open_client(library: str, settings: ClientSettings) -> KafkaClient:
    """The ``KafkaClient`` of ``library`` (``kafka-python`` or ``confluent-kafka``)."""
    if library == "confluent-kafka":
        from connectors.kafka_confluent import ConfluentKafkaClient

        return ConfluentKafkaClient(settings)
    if library == "kafka-python":
        return PythonKafkaClient(settings)
    raise ValueError(f"unknown Kafka client library {library!r}")


class PythonKafkaClient:
    """``KafkaClient`` on kafka-python. Static group membership (``group_instance_id``): a restarted
    instance takes its partitions back at once instead of waiting out a rebalance."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.consumer = None
        self._producers: list[Any] = []
        self._senders: list[BulkSender] = []
        self._active = 0  # the producer of the open transaction
        self._committing: tuple[int, str, Any] | None = None  # (producer, "offsets" | "commit", result)
        self._send_failed: Exception | None = None

    def ensure_topics(self, inputs: list[str], others: list[str], changelog: str) -> int:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=self.settings.bootstrap, **self.settings.client)
        try:
            counts = [_partition_count(admin, t) for t in inputs]
            width = input_width(inputs, counts)
            new = [NewTopic(t, width, -1) for t, n in zip(inputs, counts, strict=True) if n is None]
            new += [NewTopic(t, width, -1) for t in others if _partition_count(admin, t) is None]
            have = _partition_count(admin, changelog)
            if have is None:
                new.append(NewTopic(changelog, width, -1, topic_configs={"cleanup.policy": "compact"}))
            elif have < width:
                raise ValueError(f"changelog topic {changelog} has {have} partitions, inputs need {width}")
            for topic in new:
                try:
                    admin.create_topics([topic])
                except TopicAlreadyExistsError:
                    log.debug("topic %s was created concurrently", topic.name)
            return width
        finally:
            admin.close()

    def start(
        self,
        topics: list[str],
        on_assigned: PartitionCallback,
        on_revoked: PartitionCallback,
        on_lost: PartitionCallback | None = None,
    ) -> None:
        from kafka import KafkaConsumer

        self._producers = [self._transactional_producer(i) for i in range(2)]
        self._senders = [BulkSender(p) for p in self._producers]
        self._active = 0
        self._producers[0].begin_transaction()
        self.consumer = KafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            group_id=self.settings.group_id,
            group_instance_id=self.settings.member_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            **{
                "metadata_max_age_ms": 10_000,
                "receive_message_max_bytes": 100_000_000,  # 2.x's 1 MB is below one fetch response
                **self.settings.client,
                **self.settings.consumer,
            },
        )
        _complete_every_rejoin(self.consumer)
        _read_in_bulk(self.consumer)
        for producer in self._producers:
            _fence_offset_commits(producer, self.consumer)
        for topic in topics:  # know the partitions before joining, or the first assignment may be empty
            self.consumer.partitions_for_topic(topic)
        listener = _Listener(on_assigned, on_revoked, self._before_assigned)
        if on_lost is not None:  # kafka-python calls the revocation; the group generation tells them apart
            listener.on_lost, listener.is_lost = on_lost, lambda: _membership(self.consumer).generation_id < 0
        self.consumer.subscribe(topics, listener=listener)

    @property
    def producer(self) -> Any:
        """The transactional producer of the open transaction (outputs, dead letters, changelog rows)."""
        return self._producers[self._active]

    def transactional_id(self, index: int) -> str:
        """Producer 0 has the process's member id (as before there were two), producer 1 the same + "-1"."""
        return self.settings.member_id if index == 0 else f"{self.settings.member_id}-{index}"

    def _transactional_producer(self, index: int) -> Any:
        """Producer ``index`` (0 or 1), ready for a transaction. Its ``init_transactions`` aborts a
        transaction its id left open and fences its older producers (a crashed predecessor's)."""
        from kafka import KafkaProducer

        producer = KafkaProducer(
            bootstrap_servers=self.settings.bootstrap,
            transactional_id=self.transactional_id(index),
            transaction_timeout_ms=self.settings.transaction_timeout_ms,
            acks="all",
            **{
                "linger_ms": 2,
                "batch_size": 256 * 1024,
                # retries of CONCURRENT_TRANSACTIONS (see kafka_confluent.py)
                "retry_backoff_ms": 10,
                **self.settings.client,
                **self.settings.producer,
            },
        )
        _abort_only_undrained(producer)
        producer.init_transactions()
        return producer

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        """Records of the current assignment, as ``(topic, partition, offset, key, value)`` tuples
        (``_read_in_bulk``). Out of the group (its session expired), the consumer may still hand out
        records of partitions that are another process's now: they are dropped (the rejoin fetches every
        partition's position from the committed offsets again). Moves an overlapped commit on."""
        if self._committing is not None:
            self._advance_commit(raising=False)  # a failure is the next commit's (or abort's) to handle
        polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        if not polled:
            return []
        if _membership(self.consumer).generation_id < 0:
            return []
        if len(polled) == 1:
            return next(iter(polled.values()))
        return [r for records in polled.values() for r in records]

    # Sends go into the open transaction. One that fails because the transaction already failed (the
    # producer was fenced, a batch was refused) is dropped: the transaction cannot commit, and the next
    # ``commit`` says so (``TransactionFailed``), so the pipeline aborts and rolls back.
    def send(self, topic, key, value, headers=None, partition=None) -> None:
        from kafka.errors import KafkaError, MessageSizeTooLargeError

        try:
            self.producer.send(topic, key=key, value=value, headers=headers, partition=partition)
        except MessageSizeTooLargeError:
            raise
        except KafkaError as exc:
            self._doomed(exc)

    def send_many(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        from kafka.errors import KafkaError, MessageSizeTooLargeError

        try:
            self._senders[self._active].send_many(topic, messages)
        except MessageSizeTooLargeError:
            raise
        except KafkaError as exc:
            self._doomed(exc)

    def send_to_partitions(self, topic: str, rows: Mapping[int, list[tuple[bytes, bytes | None]]]) -> None:
        from kafka.errors import KafkaError

        try:
            self._senders[self._active].send_to_partitions(topic, rows)
        except KafkaError as exc:
            self._doomed(exc)

    def _doomed(self, exc: Exception) -> None:
        if self._send_failed is None:
            log.warning("the open transaction cannot commit (%s): it will be aborted", exc)
            self._send_failed = exc

    def commit(self, next_offsets: dict[tuple[str, int], int], wait: bool = True) -> None:
        """Commit the open transaction with ``next_offsets``.

        Overlapped (``wait=False``): the transaction's offsets and its commit go to the broker while the
        other producer opens the next transaction at once, so outputs keep flowing during the commit (no
        pause of the pipeline, no output waiting for it, and no CONCURRENT_TRANSACTIONS back-off for the
        next transaction, which is the other transactional id's). ``poll`` moves the commit on; the next
        ``commit`` first waits for it and raises ``TransactionFailed`` if it failed (the transaction
        opened meanwhile is then aborted with it by ``abort``). Transactions therefore commit one at a
        time, in order, each with the offsets of everything read before it: the same sequence of
        checkpoints as with one producer. ``wait=True`` returns once this one is committed."""
        from kafka import TopicPartition
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        self._finish_commit()
        if self._send_failed is not None:
            exc, self._send_failed = self._send_failed, None
            raise TransactionFailed(f"a send of this transaction failed: {exc}")
        producer = self.producer
        manager = producer._transaction_manager
        try:
            if next_offsets:
                offsets = {
                    TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in next_offsets.items()
                }
                if _membership(self.consumer).generation_id < 0:
                    raise TransactionFailed("this process left the group: its partitions may be elsewhere")
                # the group id: the membership goes with it (_fence_offset_commits, KIP-447); the commit
                # itself follows once the offsets are in (_advance_commit)
                self._committing = (
                    self._active,
                    "offsets",
                    manager.send_offsets_to_transaction(offsets, self.settings.group_id),
                )
            else:
                self._committing = (self._active, "commit", manager.begin_commit())
        except KafkaError as exc:
            raise TransactionFailed(str(exc)) from exc
        producer._sender.wakeup()
        self._active = 1 - self._active  # the next transaction, on the other producer
        try:
            self.producer.begin_transaction()
        except KafkaError as exc:  # its last transaction failed fatally (fenced): aborted with the rest
            self._doomed(exc)
        if wait:
            self._finish_commit()

    def _advance_commit(self, block: bool = False, raising: bool = True) -> None:
        """Move the overlapped commit on: offsets in → commit; commit done → nothing in flight. Raises
        ``TransactionFailed`` when it failed (``raising=False``: leaves the failure for later). ``block``:
        wait for each step."""
        from kafka.errors import KafkaError

        while self._committing is not None:
            index, stage, result = self._committing
            if not result.is_done:
                if not block:
                    return
                with contextlib.suppress(Exception):  # a failure: read from the result below
                    result.wait(timeout_ms=self.COMMIT_TIMEOUT_S * 1000)
                if not result.is_done:
                    self._committing = None
                    raise TransactionFailed(f"commit of producer {index} took over {self.COMMIT_TIMEOUT_S} s")
            if result.failed:
                if not raising:
                    return
                self._committing = None
                raise TransactionFailed(f"{type(result.exception).__name__}: {result.exception}")
            if stage == "commit":
                self._committing = None
                return
            producer = self._producers[index]
            try:
                self._committing = (index, "commit", producer._transaction_manager.begin_commit())
            except KafkaError as exc:
                self._committing = None
                raise TransactionFailed(str(exc)) from exc
            producer._sender.wakeup()

    COMMIT_TIMEOUT_S = 60

    def _finish_commit(self) -> None:
        """Wait for the overlapped commit, if any; ``TransactionFailed`` if it failed."""
        if self._committing is not None:
            self._advance_commit(block=True)

    settle = _finish_commit

    def abort(self) -> None:
        """Abort the open transaction, and the one being committed if that commit failed (or does), and
        open a new one. A producer whose abort fails (fenced, timed out while the process stalled) is
        replaced, which aborts its transaction."""
        from kafka.errors import KafkaError

        try:
            self._finish_commit()
        except TransactionFailed as exc:
            log.info("the overlapped commit failed too (%s): aborted as well", exc)
        self._send_failed = None
        for index, producer in enumerate(self._producers):
            manager = producer._transaction_manager
            if manager.has_fatal_error():
                self._renew_producer(index)
            elif manager._test_has_ongoing_transaction():  # open, or failed but abortable
                try:
                    producer.abort_transaction()
                except KafkaError as exc:
                    log.warning(
                        "abort failed (%s): replacing the producer, which aborts its transaction", exc
                    )
                    self._renew_producer(index)
        self.producer.begin_transaction()

    def _renew_producer(self, index: int) -> None:
        old = self._producers[index]
        try:
            old.close(timeout=5)
        except Exception:
            log.exception("while closing the failed producer")
        self._producers[index] = self._transactional_producer(index)
        self._senders[index] = BulkSender(self._producers[index])
        _fence_offset_commits(self._producers[index], self.consumer)

    def rewind_to_committed(self) -> None:
        for tp in self.consumer.assignment():
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)

    def assigned_partitions(self) -> list[int]:
        return sorted({tp.partition for tp in self.consumer.assignment()})

    def read_changelog(self, topic: str, partitions: Iterable[int]) -> dict[int, dict[StreamId, bytes]]:
        """Read with a librdkafka consumer: with kafka-python 3.0, a second kafka-python consumer in the
        process intermittently stalls the group consumer's fetches (reproduced; see README)."""
        from connectors.kafka_confluent import librdkafka_settings, read_changelog

        settings = librdkafka_settings(self.settings.bootstrap, self.settings.client)
        return read_changelog(settings, f"{self.settings.group_id}-restore", topic, partitions)

    def _before_assigned(self, partitions: set) -> None:
        """Runs before kafka-python fetches the committed offsets of a new assignment."""
        _forget_offset_fetches(self.consumer)
        self._wait_for_stable_offsets(partitions)

    def _wait_for_stable_offsets(self, partitions: set) -> None:
        """Block until no transaction still holds pending offset commits for ``partitions``.

        A transaction's commit returns before its markers are written; until then the group coordinator
        keeps its offsets pending and an OffsetFetch without ``require_stable`` (kafka-python 2.x sends
        v5, no such flag) returns the offsets from before it, so a new owner would replay events onto a
        state that already holds them. librdkafka sets ``require_stable`` (KIP-447) under read_committed
        and retries until the offsets are stable; kafka-python's own fetch, which follows this callback,
        then sees them."""
        from confluent_kafka import Consumer
        from confluent_kafka import TopicPartition as Tp

        from connectors.kafka_confluent import librdkafka_settings

        if not partitions:
            return
        settings = librdkafka_settings(self.settings.bootstrap, self.settings.client)
        probe = Consumer(
            {
                **settings,
                "group.id": self.settings.group_id,  # never subscribes: queries offsets, joins nothing
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                answers = probe.committed([Tp(tp.topic, tp.partition) for tp in partitions], timeout=60)
                unsettled = [tp for tp in answers if tp.error is not None]
                if not unsettled:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"committed offsets still unsettled: {unsettled}")
                log.info("committed offsets not settled yet (%s): asking again", unsettled[0].error)
                time.sleep(0.1)
        finally:
            probe.close()

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
        if self._producers:
            self.abort_quietly()
            for producer in self._producers:
                producer.close()

    def abort_quietly(self) -> None:
        from kafka.errors import KafkaError

        try:
            self._finish_commit()
        except TransactionFailed:
            log.debug("the last commit failed")
        for producer in self._producers:
            if producer._transaction_manager._test_has_ongoing_transaction():
                try:
                    producer.abort_transaction()
                except KafkaError:
                    log.debug("no transaction to abort")


def input_width(inputs: list[str], counts: list[int | None]) -> int:
    """The partition count the inputs share (topics still to be created get it too). Raises
    ``ValueError`` naming ``source.topics`` when existing inputs differ: a stream's state is keyed by
    its partition number, so partition 3 of two topics must be the same task."""
    have = {t: n for t, n in zip(inputs, counts, strict=True) if n}
    if len(set(have.values())) > 1:
        raise ValueError(f"source.topics: the input topics have different partition counts {have}")
    return max(have.values(), default=1)


def _partition_count(admin: Any, topic: str) -> int | None:
    meta = admin.describe_topics([topic])
    if not meta or meta[0].get("error_code", 0) != 0:
        return None
    return len(meta[0]["partitions"]) or None


def _read_in_bulk(consumer: Any) -> None:
    """Make ``consumer`` read each fetched batch's records in one loop into plain ``(topic, partition,
    offset, key, value)`` tuples, CRCs checked with a compiled CRC-32C (``connectors.kafka_records``):
    kafka-python's own reader builds a ``ConsumerRecord`` per record through generators and checks CRCs in
    pure Python. Only this consumer's fetcher is changed."""
    from connectors.kafka_records import fast_partition_records, install_crc32c

    install_crc32c()
    consumer._fetcher.PartitionRecords = fast_partition_records()


class BulkSender:
    """A kafka-python producer fed many records at a time: records are grouped by partition and appended to
    the producer's accumulator as whole chunks of a record batch (``connectors.kafka_records.FastBatch``),
    where its sender thread drains them like its own batches (sequence numbers, transactions, retries).
    kafka-python's ``send`` costs ~46 µs per record (metadata checks, a partitioner call, a future per
    record, a per-record append under a lock); here a record costs about 1 µs. The partition of a key is
    the one kafka-python's partitioner picks (murmur2, like the Java client), remembered per key.

    Falls back to ``send`` per record when the producer compresses (``compression_type``)."""

    MAX_KEYS = 1_000_000
    """Keys whose partition is remembered, per topic (then forgotten all at once)."""

    def __init__(self, producer: Any) -> None:
        from kafka.partitioner.default import DefaultPartitioner

        from connectors.kafka_records import install_crc32c

        install_crc32c()
        self.producer = producer
        self.bulk = producer.config["compression_attrs"] == 0
        partitioner = producer.config["partitioner"]
        self._deterministic = isinstance(partitioner, DefaultPartitioner) or partitioner is DefaultPartitioner
        self._partitions: dict[str, tuple[frozenset, dict[bytes, int]]] = {}

    def send_many(self, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
        if not messages:
            return
        if not self.bulk:
            send = self.producer.send
            for key, value in messages:
                send(topic, key=key, value=value)
            return
        partitions, known = self._partitions_of(topic)
        groups: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
        for message in messages:
            key = message[0]
            p = known.get(key)
            if p is None:
                p = self._pick(topic, key, partitions, known)
            group = groups.get(p)
            if group is None:
                groups[p] = [message]
            else:
                group.append(message)
        self._append(topic, groups)

    def send_to_partitions(self, topic: str, rows: Mapping[int, list[tuple[bytes, bytes | None]]]) -> None:
        if not rows:
            return
        if not self.bulk:
            for p, pairs in rows.items():
                for key, value in pairs:
                    self.producer.send(topic, key=key, value=value, partition=p)
            return
        partitions, _ = self._partitions_of(topic)
        unknown = set(rows).difference(partitions)
        if unknown:
            raise ValueError(f"topic {topic} has no partitions {sorted(unknown)}")
        self._append(topic, rows)

    def _partitions_of(self, topic: str) -> tuple[frozenset, dict[bytes, int]]:
        producer = self.producer
        partitions = producer._metadata.partitions_for_topic(topic)
        entry = self._partitions.get(topic)
        if entry is not None and partitions is not None and len(partitions) == len(entry[0]):
            if len(entry[1]) > self.MAX_KEYS:
                entry[1].clear()
            return entry
        partitions = producer._wait_on_metadata(topic, producer.config["max_block_ms"])
        entry = self._partitions[topic] = (frozenset(partitions), {})
        return entry

    def _pick(self, topic: str, key: bytes | None, partitions: frozenset, known: dict) -> int:
        available = self.producer._metadata.available_partitions_for_topic(topic)
        p = self.producer.config["partitioner"](key, sorted(partitions), list(available or ()))
        if key is not None and self._deterministic:
            known[key] = p
        return p

    def _append(self, topic: str, groups: Mapping[int, list[tuple[bytes | None, bytes | None]]]) -> None:
        from kafka import TopicPartition

        from connectors.kafka_records import append_many

        producer = self.producer
        assert not producer._closed, "KafkaProducer already closed!"
        manager = producer._transaction_manager
        transactional = manager is not None and manager.is_transactional()
        limit = producer.config["max_request_size"]
        wake = False
        for p, messages in groups.items():
            tp = TopicPartition(topic, p)
            if transactional:
                manager.maybe_add_partition_to_transaction(tp)  # raises once the transaction failed
            wake = append_many(producer, tp, messages, limit) or wake
        if wake:
            producer._sender.wakeup()


def _abort_only_undrained(producer: Any) -> None:
    """Work around a kafka-python 2.3.3 bug that stopped a producer's network thread (found with the
    fencing test and overlapped commits).

    When a transaction is aborted, the sender fails the batches not sent yet
    (``RecordAccumulator.abort_undrained_batches``), but it takes every batch not *done* for one, and a
    batch that was sent and is waiting for its answer is no longer in its partition's queue: ``remove``
    raises ``ValueError`` in the network thread, on every pass, and the abort never completes. A batch in
    flight is completed by its answer (into the aborted transaction); as in the Java client, only the
    batches still queued are failed here. Only this producer's accumulator is changed."""
    accumulator = producer._accumulator

    def abort_undrained_batches(error: Exception) -> None:
        for batch in accumulator._incomplete.all():
            with accumulator._tp_lock(batch.topic_partition):
                queued = accumulator._batches[batch.topic_partition]
                if batch.is_done or batch not in queued:
                    continue
                batch.records.close()
                queued.remove(batch)
            batch.abort(error)
            accumulator.deallocate(batch)

    accumulator.abort_undrained_batches = abort_undrained_batches


def _complete_every_rejoin(consumer: Any) -> None:
    """Work around a kafka-python 2.3.3 bug that lost assignments (found with the kill -9 test).

    The group leader rejoins when the topic metadata it sees differs from the metadata it assigned with
    (``_assignment_snapshot != _metadata_snapshot``; this happens right after the first join, whose
    snapshot predates the subscription's metadata). That condition is checked in ``need_rejoin()`` but
    never recorded in ``rejoin_needed``. ``join_group`` calls ``on_partitions_revoked`` and sends
    JoinGroup; when the join does not finish within one ``poll`` (the service polls for 5 ms), the
    leader's ``_perform_assignment`` has meanwhile reset the snapshot, the next ``need_rejoin()`` is
    False, the pending join is abandoned, ``on_partitions_assigned`` is never called, and ``poll`` goes
    on returning records of the still-assigned partitions: the service, having dropped their streams on
    revocation, stepped them from the initial state (every stream diverged, no error logged). Apache
    Kafka fixed the same hole in its Java client (KAFKA-9815) by requesting the rejoin when the check
    fires; this does the same, so the join runs to completion and the assignment callback follows."""
    coordinator = consumer._coordinator
    need_rejoin = coordinator.need_rejoin

    def need_rejoin_recorded() -> bool:
        if need_rejoin():
            coordinator.rejoin_needed = True  # request_rejoin(), without its log line on every poll
            return True
        return False

    coordinator.need_rejoin = need_rejoin_recorded


# ---- KIP-447 offset fencing for kafka-python 2.x -----------------------------------------------------------


@dataclass(frozen=True)
class GroupMembership:
    """The consumer's place in its group when offsets are sent: what the broker checks a transactional
    offset commit against (KIP-447). ``generation_id`` is -1 once the consumer knows it left the group."""

    generation_id: int
    member_id: str
    group_instance_id: str | None


def _membership(consumer: Any) -> GroupMembership:
    coordinator = consumer._coordinator
    with coordinator._lock:
        generation = coordinator._generation
    return GroupMembership(generation.generation_id, generation.member_id, coordinator.group_instance_id)


def _txn_offset_commit_v3() -> tuple[type, type]:
    """TxnOffsetCommit v3 (KIP-447, brokers 2.5+): v2 plus the committing member's generation, member id
    and group instance id, so that the group coordinator refuses offsets from a member that is no longer
    in the current generation. kafka-python 2.x knows only v0-v2."""
    from kafka.protocol.api import Request, Response
    from kafka.protocol.types import CompactArray, CompactString, Int16, Int32, Int64, Schema, TaggedFields

    class TxnOffsetCommitResponseV3(Response):
        API_KEY = 28
        API_VERSION = 3
        FLEXIBLE_VERSION = True
        SCHEMA = Schema(
            ("throttle_time_ms", Int32),
            (
                "topics",
                CompactArray(
                    ("name", CompactString("utf-8")),
                    (
                        "partitions",
                        CompactArray(("index", Int32), ("error_code", Int16), ("tags", TaggedFields)),
                    ),
                    ("tags", TaggedFields),
                ),
            ),
            ("tags", TaggedFields),
        )

    class TxnOffsetCommitRequestV3(Request):
        API_KEY = 28
        API_VERSION = 3
        FLEXIBLE_VERSION = True
        RESPONSE_TYPE = TxnOffsetCommitResponseV3
        SCHEMA = Schema(
            ("transactional_id", CompactString("utf-8")),
            ("group_id", CompactString("utf-8")),
            ("producer_id", Int64),
            ("producer_epoch", Int16),
            ("generation_id", Int32),
            ("member_id", CompactString("utf-8")),
            ("group_instance_id", CompactString("utf-8")),
            (
                "topics",
                CompactArray(
                    ("name", CompactString("utf-8")),
                    (
                        "partitions",
                        CompactArray(
                            ("index", Int32),
                            ("offset", Int64),
                            ("leader_epoch", Int32),
                            ("metadata", CompactString("utf-8")),
                            ("tags", TaggedFields),
                        ),
                    ),
                    ("tags", TaggedFields),
                ),
            ),
            ("tags", TaggedFields),
        )

    return TxnOffsetCommitRequestV3, TxnOffsetCommitResponseV3


def _patch_offset_commit_handler() -> None:
    """Make kafka-python's ``TxnOffsetCommitHandler`` send v3 with the membership its transaction manager
    carries (``group_membership``, set by ``_fence_offset_commits``) and treat the broker's fencing answers
    as abortable errors (kafka-python 2.3.3 makes every unlisted error fatal, and its own retriable branch
    raises ``AttributeError``). Without ``group_membership`` the handler is kafka-python's, unchanged.
    The class is patched in place: kafka-python creates it by name and calls ``super()`` through that name."""
    import kafka.errors as errors
    from kafka.producer.transaction_manager import TxnOffsetCommitHandler as Handler
    from kafka.structs import TopicPartition

    if getattr(Handler, "fences", False):
        return
    request_v3, _ = _txn_offset_commit_v3()
    fenced = (
        errors.IllegalGenerationError,
        errors.UnknownMemberIdError,
        errors.FencedInstanceIdError,
        errors.RebalanceInProgressError,
        errors.GroupAuthorizationFailedError,
    )
    retriable = (errors.CoordinatorNotAvailableError, errors.NotCoordinatorError, errors.RequestTimedOutError)
    build_v2, handle_v2 = Handler._build_request, Handler.handle_response

    def build_request(self):
        membership = getattr(self.transaction_manager, "group_membership", None)
        if membership is None:
            return build_v2(self)
        topics: dict[str, list] = {}
        for tp, offset in self.offsets.items():
            topics.setdefault(tp.topic, []).append((tp.partition, offset.offset, -1, offset.metadata, {}))
        m = membership()
        return request_v3(
            transactional_id=self.transactional_id,
            group_id=self.consumer_group_id,
            producer_id=self.producer_id,
            producer_epoch=self.producer_epoch,
            generation_id=m.generation_id,
            member_id=m.member_id,
            group_instance_id=m.group_instance_id,
            topics=[(t, parts, {}) for t, parts in topics.items()],
            tags={},
        )

    def handle_response(self, response):
        if getattr(self.transaction_manager, "group_membership", None) is None:
            return handle_v2(self, response)
        pending = self.transaction_manager._pending_txn_offset_commits
        retry = lookup = False
        for topic, partitions, _tags in response.topics:
            for partition, code, _ in partitions:
                error = errors.for_code(code)
                if error is errors.NoError:
                    pending.pop(TopicPartition(topic, partition), None)
                elif error in retriable or error is errors.UnknownTopicOrPartitionError:
                    retry, lookup = True, lookup or error is not errors.UnknownTopicOrPartitionError
                elif error in fenced:
                    self.abortable_error(error(f"offsets of group {self.consumer_group_id} refused"))
                    return
                else:
                    self.fatal_error(error())
                    return
        if lookup:
            self.transaction_manager._lookup_coordinator("group", self.consumer_group_id)
        if not retry:
            self.result.done()
        elif pending:
            self.offsets = pending
            self.request = self._build_request()
            self.reenqueue()

    Handler._build_request, Handler.handle_response, Handler.fences = build_request, handle_response, True


def _fence_offset_commits(producer: Any, consumer: Any) -> None:
    """Make ``producer``'s transactional offset commits carry ``consumer``'s group membership (KIP-447).

    kafka-python 2.x commits offsets in a transaction with the group id only, and the transactional id
    is per process: a process that stalls past its session timeout while its partitions move to another
    one would, on waking, commit its open transaction (outputs, changelog rows, and offsets older than
    the new owner's) for partitions it no longer owns. With the generation in the request the broker
    refuses such a commit; the transaction becomes abortable and the service aborts it."""
    _patch_offset_commit_handler()
    producer._transaction_manager.group_membership = lambda: _membership(consumer)


def _forget_offset_fetches(consumer: Any) -> None:
    """Work around a kafka-python 2.3.3 bug that replayed partitions from old offsets (found with the
    fencing test).

    ``fetch_committed_offsets`` caches its OffsetFetch future by the set of partitions asked for and drops
    it only once a call sees it done. The service polls for 5 ms, so the fetch for a new assignment
    usually outlives the poll that sent it; when a rebalance then changes the assignment, the future
    stays in the cache, and the next time the same set of partitions is assigned (minutes later, after
    other processes committed far beyond) kafka-python takes its old answer: the partitions restart from
    the offsets committed back then (or from the beginning) while their streams are restored from the
    changelog, so events are applied and answered twice. Forgetting the cached fetches at each assignment
    makes every assignment ask the coordinator again."""
    consumer._coordinator._offset_fetch_futures.clear()


class _Listener(ConsumerRebalanceListener):
    """kafka-python rebalance listener. kafka-python 3 calls it on its network thread, where blocking
    consumer calls are not allowed (the service's callbacks only use the producer and other clients).
    ``before_assigned`` runs before kafka-python fetches the committed offsets of the new partitions."""

    def __init__(
        self,
        on_assigned: PartitionCallback,
        on_revoked: PartitionCallback,
        before_assigned: Callable[[set], None] | None = None,
    ) -> None:
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.on_lost = on_revoked
        self.is_lost: Callable[[], bool] = lambda: False
        self.before_assigned = before_assigned

    def on_partitions_revoked(self, revoked) -> None:
        handle = self.on_lost if self.is_lost() else self.on_revoked
        handle(sorted({tp.partition for tp in revoked}))

    def on_partitions_assigned(self, assigned) -> None:
        if self.before_assigned is not None:
            self.before_assigned(set(assigned))
        self.on_assigned(sorted({tp.partition for tp in assigned}))


# ---- the pipeline's contracts ----------------------------------------------------------------------------


class Sender(Protocol):
    """What sinks need from a producer: the transactional ``KafkaClient`` or a plain ``KafkaProducer``."""

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None: ...

    def send_many(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None: ...


class KafkaSource:
    """Input topics (and an optional feedback topic) read by a consumer group, exactly-once: ``commit``
    adds the offsets of everything polled to the open transaction and commits it, together with every
    output, dead letter and changelog record sent since the last commit."""

    guarantee: Guarantee = "exactly-once"

    def __init__(
        self, client: KafkaClient, topics: list[str], feedback_topic: str | None, max_poll_records: int
    ) -> None:
        self.client = client
        self.topics = topics + ([feedback_topic] if feedback_topic else [])
        self.feedback_topic = feedback_topic
        self.max_poll_records = max_poll_records
        self._next: dict[tuple[str, int], int] = {}  # (topic, partition) → next offset to read

    def open(self, assignment: Assignment, resume: Mapping[str, Any]) -> None:
        """Init transactions (fencing a crashed predecessor) and join the group; ``resume`` is unused:
        the offsets are committed in Kafka."""
        self.client.start(self.topics, assignment.assigned, assignment.revoked, assignment.lost)

    def poll(self, timeout_s: float) -> list[Message]:
        records = self.client.poll(timeout_s, self.max_poll_records)
        if not records:
            return []
        now = time.monotonic()
        feedback = self.feedback_topic
        nxt = self._next
        out = []
        append = out.append
        for topic, partition, offset, key, value in records:
            append(Message(value, key, partition, offset, topic, now, topic == feedback))
        for at, offset in {(r[0], r[1]): r[2] for r in records}.items():  # the last offset per partition
            nxt[at] = offset + 1
        return out

    @property
    def exhausted(self) -> bool:
        return False

    def positions(self) -> dict[str, Any]:
        return {}

    overlaps_commits = True
    """``commit(wait=False)`` may return before the transaction is committed (``PythonKafkaClient.commit``):
    a failure is then raised by the next ``commit``."""

    def commit(self, wait: bool = True) -> None:
        offsets, self._next = self._next, {}
        try:
            self.client.commit(offsets, wait)
        except TransactionFailed as exc:
            raise CheckpointFailed(str(exc)) from exc

    def settle(self) -> None:
        """Wait for an overlapped commit (``commit(wait=False)``); ``CheckpointFailed`` if it failed."""
        try:
            self.client.settle()
        except TransactionFailed as exc:
            raise CheckpointFailed(str(exc)) from exc

    def rollback(self) -> list[int]:
        """Abort the open transaction and seek back to the committed offsets."""
        self._next = {}
        self.client.abort()
        self.client.rewind_to_committed()
        return self.client.assigned_partitions()

    def close(self) -> None:
        self.client.close()


class KafkaSink:
    """Outputs to ``topic``, keyed by stream id, encoded as ``encoding``."""

    def __init__(self, sender: Sender, topic: str, encoding: Encoding = "json", owns: bool = False) -> None:
        self.sender = sender
        self.topic = topic
        self.encoding: Encoding = encoding
        self._owns = owns  # a plain producer of its own: flushed and closed here

    @property
    def writes_json(self) -> bool:
        """``write_json`` takes documents already encoded (``connectors.base.JsonSink``)."""
        return self.encoding == "json"

    def write(self, outputs: list[Output]) -> None:
        enc = self.encoding
        self.sender.send_many(
            self.topic, [(o.stream_id.encode(), encode_document(o.doc, enc)) for o in outputs]
        )

    def write_json(self, pairs: list[tuple[bytes, bytes]]) -> None:
        self.sender.send_many(self.topic, pairs)

    def flush(self) -> None:
        if self._owns:
            self.sender.flush()  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._owns:
            self.sender.close()  # type: ignore[attr-defined]


class KafkaDeadLetters:
    """Rejected input to ``topic`` with its original key and bytes and the reason in headers (``reason``,
    ``source.topic``, ``source.partition``, ``source.offset``)."""

    def __init__(self, sender: Sender, topic: str, owns: bool = False) -> None:
        self.sender = sender
        self.topic = topic
        self._owns = owns

    def write(self, letter: DeadLetter) -> None:
        key = letter.key.encode() if isinstance(letter.key, str) else letter.key
        headers = dead_letter_headers(letter.reason, letter.topic, letter.partition, letter.position)
        self.sender.send(self.topic, key, raw_bytes(letter.raw), headers)

    def flush(self) -> None:
        if self._owns:
            self.sender.flush()  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._owns:
            self.sender.close()  # type: ignore[attr-defined]


def raw_bytes(raw: Any) -> bytes | None:
    """What a dead letter carries as its value: bytes as received; text as UTF-8; anything else (a CSV
    row) as JSON (``json_safe``)."""
    if raw is None or isinstance(raw, bytes):
        return raw
    if isinstance(raw, str):
        return raw.encode(errors="backslashreplace")
    return encode_document({"row": json_safe(raw)})


class KafkaChangelog:
    """The state backend of a Kafka source: partition ``p`` of a compacted topic holds the rows of the
    streams of input partition ``p``. Writes go into the source's open transaction."""

    def __init__(self, client: KafkaClient, topic: str) -> None:
        self.client = client
        self.topic = topic
        self._rows: dict[int, list[tuple[bytes, bytes | None]]] = {}

    def read(self, partitions: list[int]) -> dict[int, dict[str, bytes]]:
        return self.client.read_changelog(self.topic, partitions) if partitions else {}

    def write(self, partition: int, stream_id: str, row: bytes | None) -> None:
        """Kept until ``save``, which sends a checkpoint's rows together."""
        rows = self._rows.get(partition)
        if rows is None:
            rows = self._rows[partition] = []
        rows.append((stream_id.encode(), row))

    def save(self, positions: Mapping[str, Any]) -> None:
        """Send the rows written since the last save into the open transaction; ``KafkaSource.commit``
        commits it."""
        rows, self._rows = self._rows, {}
        if rows:
            self.client.send_to_partitions(self.topic, rows)

    def positions(self) -> dict[str, Any]:
        return {}


class KafkaProducer:
    """A plain idempotent kafka-python producer (``Sender``) for Kafka sinks fed by other sources."""

    def __init__(self, settings: ClientSettings) -> None:
        from kafka import KafkaProducer as Producer

        self._producer = Producer(
            bootstrap_servers=settings.bootstrap,
            acks="all",
            **{"linger_ms": 2, "batch_size": 256 * 1024, **settings.client, **settings.producer},
        )
        self._bulk = BulkSender(self._producer)

    def send(self, topic, key, value, headers=None, partition=None) -> None:
        self._producer.send(topic, key=key, value=value, headers=headers, partition=partition)

    def send_many(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        self._bulk.send_many(topic, messages)

    def flush(self) -> None:
        self._producer.flush(60)

    def close(self) -> None:
        self._producer.close()
