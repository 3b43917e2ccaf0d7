"""Record batches built and read in bulk for kafka-python (``connectors.kafka_records``): the same bytes
and the same records as kafka-python's own code, without a broker."""

from __future__ import annotations

import os
import random

import pytest
from kafka.consumer.fetcher import READ_COMMITTED, READ_UNCOMMITTED, Fetcher
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords
from kafka.record._crc32c import crc as pure_python_crc32c
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.memory_records import MemoryRecordsBuilder
from kafka.structs import TopicPartition

from connectors import kafka_records as kr

TP = TopicPartition("t", 3)


@pytest.mark.parametrize("size", [0, 1, 3, 4, 7, 8, 9, 100, 4095, 8192, 10_000, 100_003])
def test_every_crc32c_implementation_agrees_with_kafka_python(size: int) -> None:
    data = os.urandom(size)
    expected = pure_python_crc32c(data)
    assert kr.crc32c(data) == expected
    assert kr._crc32c_table(data) == expected
    assert kr._crc32c_numpy(data) == expected
    assert kr._crc32c_fallback(memoryview(data)) == expected


def test_kafka_pythons_own_batches_use_the_fast_crc_and_stay_valid() -> None:
    kr.install_crc32c()
    builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20)
    for i in range(50):
        builder.append(timestamp=None, key=b"k%d" % i, value=os.urandom(40), headers=[])
    builder.close()
    batch = DefaultRecordBatch(builder.buffer())
    assert pure_python_crc32c(bytes(builder.buffer()[21:])) == batch.crc
    assert batch.validate_crc()


def _messages(n: int, seed: int = 0) -> list[tuple[bytes | None, bytes | None]]:
    rng = random.Random(seed)
    out: list[tuple[bytes | None, bytes | None]] = [
        (b"s%d" % rng.randrange(1000), rng.randbytes(rng.randrange(0, 300))) for _ in range(n)
    ]
    return [*out, (None, b"no key"), (b"tombstone", None), (b"big", b"x" * 40_000)]


def test_a_fast_batch_is_what_kafka_python_reads_back() -> None:
    messages = _messages(3000)
    batch = kr.FastBatch(1 << 22)
    for first, last in ((0, 100), (100, 2000), (2000, len(messages))):
        chunk: list[bytes] = []
        kr.encode_records(messages[first:last], first, first * 3, chunk)
        batch.append_encoded(b"".join(chunk), last - first)
    batch.set_producer_state(7, 1, 42, True)
    batch.close()
    read = DefaultRecordBatch(batch.buffer())
    assert read.validate_crc()
    assert (read.producer_id, read.producer_epoch, read.base_sequence) == (7, 1, 42)
    assert read.is_transactional and read.records_count == len(messages)
    records = list(read)
    assert [(r.key, r.value) for r in records] == messages
    assert [r.offset for r in records] == list(range(len(messages)))
    assert [r.headers for r in records[:3]] == [[], [], []]


def test_the_bulk_reader_returns_kafka_pythons_records_from_an_offset_on() -> None:
    messages = _messages(500)
    chunk: list[bytes] = []
    kr.encode_records(messages, 0, 0, chunk)
    batch = kr.FastBatch(1 << 22)
    batch.append_encoded(b"".join(chunk), len(messages))
    batch.close()
    data = batch.buffer()
    out: list = []
    kr.read_records(data, 61, len(data), 1000, 1007, "t", 3, out)
    assert out == [("t", 3, 1000 + i, k, v) for i, (k, v) in enumerate(messages)][7:]
    with pytest.raises(CorruptRecordError):
        kr.read_records(data[:-10], 61, len(data) - 10, 0, 0, "t", 3, [])


def _fetched(batches: list[tuple[list[tuple[bytes | None, bytes | None]], dict]]) -> bytes:
    """A fetch response's records: kafka-python-built batches at consecutive base offsets."""
    import struct

    data, base = b"", 0
    for messages, options in batches:
        builder = MemoryRecordsBuilder(magic=2, batch_size=1 << 22, **options)
        for key, value in messages:
            builder.append(timestamp=None, key=key, value=value, headers=[])
        builder.close()
        buf = bytearray(builder.buffer())
        struct.pack_into(">q", buf, 0, base)  # the broker's base offset
        data += bytes(buf)
        base += len(messages)
    return data


def _take_all(cls: type, data: bytes, fetch_offset: int, n: int, **kwargs) -> tuple[list, list[int]]:
    part = cls(fetch_offset, TP, MemoryRecords(data), **kwargs)
    taken, positions = [], []
    while part:
        got = part.take(n)
        taken += [(r[2], r[3], r[4]) if type(r) is tuple else (r.offset, r.key, r.value) for r in got]
        positions.append(part.next_fetch_offset)
    return taken, positions


@pytest.mark.parametrize("fetch_offset", [0, 5, 130])
@pytest.mark.parametrize("take", [1, 7, 1000])
def test_fast_partition_records_take_what_kafka_pythons_reader_takes(fetch_offset: int, take: int) -> None:
    batches = [
        (_messages(100, 1)[:100], {"compression_type": 0}),
        (_messages(60, 2)[:60], {"compression_type": 1}),  # gzip: kafka-python decompresses it
        (_messages(80, 3)[:80], {"compression_type": 0}),
    ]
    data = _fetched(batches)
    fast = kr.fast_partition_records()
    expected, _ = _take_all(Fetcher.PartitionRecords, data, fetch_offset, take)
    got, positions = _take_all(fast, data, fetch_offset, take)
    assert got == expected
    assert positions[-1] == 240  # past the last batch
    assert all(p == o + 1 for p, (o, _, _) in zip(positions, got[take - 1 :: take], strict=False))


def test_fast_partition_records_skip_aborted_transactions_under_read_committed() -> None:
    options = {"compression_type": 0, "transactional": True, "producer_id": 9, "producer_epoch": 0}
    data = _fetched(
        [
            (_messages(10, 1)[:10], {"compression_type": 0}),
            (_messages(10, 2)[:10], {**options, "base_sequence": 0}),  # aborted: producer 9 from offset 10
            (_messages(10, 3)[:10], {"compression_type": 0}),
        ]
    )
    fast = kr.fast_partition_records()
    for level in (READ_COMMITTED, READ_UNCOMMITTED):
        kwargs = {"isolation_level": level, "aborted_transactions": [(9, 10)]}
        expected, _ = _take_all(Fetcher.PartitionRecords, data, 0, 1000, **kwargs)
        got, positions = _take_all(fast, data, 0, 1000, **kwargs)
        assert got == expected
        assert len(got) == (20 if level == READ_COMMITTED else 30)
        assert positions[-1] == 30


def test_a_corrupt_batch_is_refused() -> None:
    data = bytearray(_fetched([(_messages(10)[:10], {"compression_type": 0})]))
    data[-3] ^= 0xFF
    part = kr.fast_partition_records()(0, TP, MemoryRecords(bytes(data)))
    with pytest.raises(CorruptRecordError):
        part.take(10)
