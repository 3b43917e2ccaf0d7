"""Apache Kafka through kafka-python: the consumer, the transactional producer, the state changelog.

- Record key = stream id (UTF-8). Values decode with ``connectors.codec``.
- Outputs go to one topic, keyed by stream id, each naming the input ``topic/partition/offset`` it answers.
- Malformed messages go to a dead-letter topic with their original bytes and a ``reason`` header.
- Stream states are written to a compacted changelog topic: partition ``p`` of the changelog holds the
  streams of input partition ``p`` (key = stream id, value = the state as raw float32; a tombstone
  when the stream ended). Changelog records, outputs and consumed offsets of one checkpoint interval
  are committed in one Kafka transaction, so after any crash the committed state and the committed
  offsets agree exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)

StreamId = str


def admin(bootstrap: str, client: dict[str, Any]) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=bootstrap, **client)


def partition_count(admin_client: KafkaAdminClient, topic: str) -> int | None:
    """Number of partitions of ``topic``, or None if it does not exist."""
    meta = admin_client.describe_topics([topic])
    if not meta or meta[0].get("error_code", 0) != 0:
        return None
    return len(meta[0]["partitions"]) or None


def ensure_topics(
    bootstrap: str, client: dict[str, Any], inputs: list[str], others: list[str], changelog: str
) -> int:
    """Create missing topics; the changelog (compacted) gets as many partitions as the widest input.
    Returns that partition count."""
    admin_client = admin(bootstrap, client)
    try:
        counts = [partition_count(admin_client, t) for t in inputs]
        missing_inputs = [t for t, n in zip(inputs, counts, strict=True) if n is None]
        width = max([n for n in counts if n] or [1])
        new = [NewTopic(t, width, -1) for t in missing_inputs]
        new += [NewTopic(t, width, -1) for t in others if partition_count(admin_client, t) is None]
        have = partition_count(admin_client, changelog)
        if have is None:
            new.append(NewTopic(changelog, width, -1, topic_configs={"cleanup.policy": "compact"}))
        elif have < width:
            raise ValueError(f"changelog topic {changelog} has {have} partitions, inputs need {width}")
        for topic in new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin_client.create_topics([topic])
        return width
    finally:
        admin_client.close()


def make_consumer(
    bootstrap: str, group_id: str, instance_id: str, client: dict[str, Any], max_poll_records: int
) -> KafkaConsumer:
    """The input consumer: manual commits (inside transactions), only committed data. Static group
    membership (``group_instance_id``): a restarted instance takes its partitions back at once instead
    of waiting out a rebalance."""
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        group_instance_id=f"{group_id}-{instance_id}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=max_poll_records,
        **client,
    )


def make_producer(
    bootstrap: str, transactional_id: str, client: dict[str, Any], timeout_ms: int
) -> KafkaProducer:
    """The transactional producer for outputs, dead letters and changelog records."""
    settings = {"linger_ms": 2, "batch_size": 256 * 1024, **client}
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=transactional_id,
        transaction_timeout_ms=timeout_ms,
        acks="all",
        **settings,
    )


def offsets_for_commit(next_offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(off, "", -1) for tp, off in next_offsets.items()}


def dead_letter_headers(reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("reason", reason.encode()),
        ("source.topic", topic.encode()),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(offset).encode()),
    ]


def read_changelog(
    bootstrap: str, client: dict[str, Any], topic: str, partitions: Iterable[int], timeout_s: float = 60.0
) -> dict[int, dict[StreamId, np.ndarray]]:
    """The committed state of each changelog partition: ``{p: {stream_id: row float32}}``, last write wins,
    tombstones removed. Reads each partition from its start to its last stable offset."""
    partitions = list(partitions)
    states: dict[int, dict[StreamId, np.ndarray]] = {p: {} for p in partitions}
    if not partitions:
        return states
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        group_id=None,
        **client,
    )
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        pending = {tp for tp in tps if consumer.position(tp) < end[tp]}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"changelog {topic}: restore did not reach the end in {timeout_s}s")
            for tp, records in consumer.poll(timeout_ms=200).items():
                table = states[tp.partition]
                for rec in records:
                    sid = rec.key.decode()
                    if rec.value is None:
                        table.pop(sid, None)
                    else:
                        table[sid] = np.frombuffer(rec.value, dtype="<f4")
            pending = {tp for tp in pending if consumer.position(tp) < end[tp]}
    finally:
        consumer.close()
    return states


def encode_state_row(row: np.ndarray) -> bytes:
    return np.ascontiguousarray(row, dtype="<f4").tobytes()


def describe(tp: TopicPartition) -> str:
    return json.dumps([tp.topic, tp.partition])
