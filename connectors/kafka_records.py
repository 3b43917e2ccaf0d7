"""Kafka record batches (message format v2) built and read in bulk, for the kafka-python client.

kafka-python handles every record on its own: ``KafkaProducer.send`` takes ~46 µs per message (metadata
checks, a partitioner call, a future per record, the batch builder's varint writes under a lock) and the
consumer builds a ``ConsumerRecord`` per record through a generator; both check each batch's CRC-32C in
pure Python (~115 ns per byte) unless the optional ``crc32c`` package is installed. At 50,000 messages/s
that alone is more than a core. Here:

- ``crc32c``: the ``crc32c`` package when installed, else a numba kernel (numba comes with librosa), else
  numpy over parallel lanes (large buffers) and a table loop (small ones). ``install_crc32c`` makes
  kafka-python's own batch code use it too.
- ``FastBatch``: a record batch that takes many records per call, in kafka-python's producer accumulator
  beside its own batches (same locks, same draining, sequence numbers and transactions); ``append_many``
  appends ``(key, value)`` pairs to a partition.
- ``FastPartitionRecords``: kafka-python's per-partition fetch reader, reading each batch's records in one
  loop into plain ``Record`` tuples (``connectors.kafka.Record``); batch-level logic (aborted
  transactions under ``read_committed``, control batches, CRC checks, compressed batches) is unchanged.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# ---- CRC-32C (Castagnoli), as Kafka's record batches use it ---------------------------------------------

_POLY = 0x82F63B78


def _tables() -> np.ndarray:
    """Slicing-by-8 tables: ``t[0]`` the byte table, ``t[k][b]`` = ``b`` followed by ``k`` zero bytes."""
    t = np.zeros((8, 256), np.uint32)
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        t[0, b] = c
    for k in range(1, 8):
        t[k] = (t[k - 1] >> 8) ^ t[0][t[k - 1] & 0xFF]
    return t


_T = _tables()
_T0 = _T[0].tolist()


def _crc32c_table(data: Any, crc: int = 0xFFFFFFFF) -> int:
    """Byte-at-a-time (small inputs)."""
    table = _T0
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_LANE = 256  # bytes per lane of the numpy kernel
_shift_cache: list[np.ndarray] = []  # [i]: the 32 columns of "append i * _LANE zero bytes" (raw CRC)
_shift_lock = threading.Lock()


def _shift_columns(lanes: int) -> np.ndarray:
    """``(lanes, 32)``: row ``i`` maps each bit of a raw CRC to its value after ``i * _LANE`` zero bytes."""
    with _shift_lock:
        if len(_shift_cache) < lanes:
            bits = np.arange(32, dtype=np.uint32)
            if not _shift_cache:
                _shift_cache.append(np.left_shift(np.uint32(1), bits))
            step = _shift_cache[0].copy()  # "append _LANE zero bytes" applied to each basis bit
            for _ in range(_LANE):
                step = (step >> 8) ^ _T[0][step & 0xFF]
            target = max(lanes, 2 * len(_shift_cache))
            while len(_shift_cache) < target:
                prev = _shift_cache[-1]
                on = ((prev[:, None] >> bits) & 1).astype(bool)  # (column, bit)
                _shift_cache.append(np.bitwise_xor.reduce(np.where(on, step[None, :], 0), axis=1))
        return np.stack(_shift_cache[:lanes])


def _crc32c_numpy(data: Any) -> int:
    """Lanes of ``_LANE`` bytes run side by side (slicing-by-8), then combine: CRC is linear, so each lane's
    raw CRC is shifted past the bytes after it and the results are XORed."""
    raw = np.frombuffer(data, np.uint8)
    n = len(raw)
    if n < 4:
        return _crc32c_table(data)
    lanes = -(-n // _LANE)
    buf = np.zeros(lanes * _LANE, np.uint8)
    pad = lanes * _LANE - n  # leading zeros leave a raw CRC (initial value 0) unchanged
    buf[pad:] = raw
    buf[pad : pad + 4] ^= 0xFF  # the initial value 0xFFFFFFFF, folded into the first four bytes
    words = buf.view("<u4").reshape(lanes, _LANE // 4)
    t0, t1, t2, t3, t4, t5, t6, t7 = _T
    crc = np.zeros(lanes, np.uint32)
    for i in range(0, _LANE // 4, 2):
        a = crc ^ words[:, i]
        b = words[:, i + 1]
        crc = (
            t7[a & 0xFF]
            ^ t6[(a >> 8) & 0xFF]
            ^ t5[(a >> 16) & 0xFF]
            ^ t4[a >> 24]
            ^ t3[b & 0xFF]
            ^ t2[(b >> 8) & 0xFF]
            ^ t1[(b >> 16) & 0xFF]
            ^ t0[b >> 24]
        )
    shifts = _shift_columns(lanes)[::-1]  # lane j is followed by lanes - 1 - j lanes
    on = ((crc[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(bool)
    return int(np.bitwise_xor.reduce(np.where(on, shifts, 0), axis=None)) ^ 0xFFFFFFFF


def _crc32c_fallback(data: Any) -> int:
    return _crc32c_numpy(data) if len(data) >= 8192 else _crc32c_table(data)


def _numba_crc32c() -> Callable[[Any], int] | None:
    """A compiled CRC-32C (about 2 ns per byte), or ``None`` without numba."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba comes with librosa
        return None
    try:

        @numba.njit(cache=True, nogil=True)
        def kernel(buf, t0, t1, t2, t3, t4, t5, t6, t7):  # pragma: no cover - compiled
            crc = np.uint32(0xFFFFFFFF)
            n = buf.shape[0]
            i = 0
            while i + 8 <= n:
                a = crc ^ (
                    np.uint32(buf[i])
                    | (np.uint32(buf[i + 1]) << 8)
                    | (np.uint32(buf[i + 2]) << 16)
                    | (np.uint32(buf[i + 3]) << 24)
                )
                crc = (
                    t7[a & 0xFF]
                    ^ t6[(a >> 8) & 0xFF]
                    ^ t5[(a >> 16) & 0xFF]
                    ^ t4[a >> 24]
                    ^ t3[buf[i + 4]]
                    ^ t2[buf[i + 5]]
                    ^ t1[buf[i + 6]]
                    ^ t0[buf[i + 7]]
                )
                i += 8
            while i < n:
                crc = t0[(crc ^ buf[i]) & 0xFF] ^ (crc >> 8)
                i += 1
            return crc ^ np.uint32(0xFFFFFFFF)

        tables = tuple(_T)
        frombuffer, uint8 = np.frombuffer, np.uint8
        if kernel(np.frombuffer(b"123456789", np.uint8), *tables) != 0xE3069283:  # compiles it now
            raise ValueError("wrong check value")
    except Exception as exc:  # no compiler for this platform, an unwritable cache...
        log.warning("numba CRC-32C unavailable (%s): using numpy", exc)
        return None

    def crc(data: Any) -> int:
        return int(kernel(frombuffer(data, uint8), *tables))

    return crc


_crc_impl: Callable[[Any], int] | None = None
_crc_lock = threading.Lock()


def crc32c(data: Any) -> int:
    """CRC-32C of ``data`` (bytes-like), as Kafka's record batches use it."""
    impl = _crc_impl or _choose_crc32c()
    return impl(data)


def _choose_crc32c() -> Callable[[Any], int]:
    global _crc_impl
    with _crc_lock:
        if _crc_impl is None:
            try:
                from crc32c import crc32c as c_crc32c  # the C package kafka-python suggests, if installed

                _crc_impl = c_crc32c
            except ImportError:
                _crc_impl = _numba_crc32c() or _crc32c_fallback
        return _crc_impl


def crc32c_backend() -> str:
    """Which implementation ``crc32c`` uses: ``crc32c`` (C package), ``numba`` or ``numpy``."""
    impl = _crc_impl or _choose_crc32c()
    if impl is _crc32c_fallback:
        return "numpy"
    return "numba" if impl.__module__ == __name__ else "crc32c"


def install_crc32c() -> None:
    """Make kafka-python's own record batches (its per-message producer path, compressed fetches) use
    ``crc32c`` instead of its pure-Python CRC. Same checksums; idempotent."""
    from kafka.record import default_records, util

    if getattr(default_records.calc_crc32c, "__module__", None) == __name__:
        return
    crc32c(b"")  # choose (and compile) now, not inside the network thread

    def calc_crc32c(memview: Any) -> int:
        return crc32c(memview)

    default_records.calc_crc32c = calc_crc32c
    util.calc_crc32c = calc_crc32c


# ---- varints (zigzag, as record fields use them) ---------------------------------------------------------


def _encode_varint(value: int) -> bytes:
    v = (value << 1) ^ (value >> 63)
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


_VARINTS = [_encode_varint(i) for i in range(1 << 15)]
_NULL = _encode_varint(-1)  # a null key or value: length -1
_ZIGZAG1 = [(b >> 1) ^ -(b & 1) for b in range(128)]  # one-byte varints
_ZIGZAG2 = [(v >> 1) ^ -(v & 1) for v in range(1 << 14)]  # two-byte varints, by their 14 bits


def varint(value: int) -> bytes:
    return _VARINTS[value] if 0 <= value < 32768 else _encode_varint(value)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint out of int64 range")


# ---- producing: a batch that takes many records at once ---------------------------------------------------

_HEADER = struct.Struct(">qiibIhiqqqhii")  # kafka-python's DefaultRecordBase.HEADER_STRUCT
_CRC_AT = 17  # the CRC field's offset
_ATTRIBUTES_AT = 21  # the CRC covers the batch from its attributes on
_TRANSACTIONAL = 0x10


class FastBatch:
    """The records of one producer batch (kafka-python's ``MemoryRecordsBuilder`` interface): encoded as
    they come, in bulk; header and CRC written once, at ``close`` (when the sender drains it and has set
    the producer id, epoch and first sequence number). kafka-python's own single-record ``append`` is
    refused, so its ``send`` starts a batch of its own after this one (order kept)."""

    __slots__ = (
        "_batch_size",
        "_buffer",
        "_chunks",
        "_count",
        "_first_ts",
        "_is_transactional",
        "_max_ts",
        "_producer_epoch",
        "_producer_id",
        "_sequence",
        "_size",
    )

    def __init__(self, batch_size: int) -> None:
        self._batch_size = batch_size
        self._chunks: list[bytes] = []
        self._size = _HEADER.size
        self._count = 0
        self._first_ts = self._max_ts = int(time.time() * 1000)
        self._producer_id, self._producer_epoch, self._sequence = -1, -1, -1
        self._is_transactional = False
        self._buffer: bytes | None = None

    # bulk appends (the accumulator's partition lock held by the caller)
    def room(self) -> int:
        """Bytes that may still be appended before the batch is full."""
        return self._batch_size - self._size if self._buffer is None else 0

    def append_encoded(self, records: bytes, count: int) -> None:
        """Records encoded by ``encode_records`` with offset deltas from ``next_offset()`` on."""
        self._chunks.append(records)
        self._size += len(records)
        self._count += count
        self._max_ts = max(self._max_ts, int(time.time() * 1000))

    def seal(self) -> None:
        """Take no more records (the next one would not fit)."""
        self._batch_size = self._size

    def timestamp_delta(self, now_ms: int) -> int:
        return max(now_ms - self._first_ts, 0)

    # kafka-python's MemoryRecordsBuilder interface
    def append(self, timestamp: Any, key: Any, value: Any, headers: Any = None) -> None:
        return None

    def next_offset(self) -> int:
        return self._count

    def is_full(self) -> bool:
        return self._buffer is not None or self._size >= self._batch_size

    def size_in_bytes(self) -> int:
        return self._size if self._buffer is None else len(self._buffer)

    def compression_rate(self) -> float:
        return 1.0

    def set_producer_state(
        self, producer_id: int, epoch: int, base_sequence: int, transactional: bool
    ) -> None:
        if self._buffer is not None:
            from kafka.errors import IllegalStateError

            raise IllegalStateError("Trying to set producer state of an already closed batch.")
        self._producer_id, self._producer_epoch, self._sequence = producer_id, epoch, base_sequence
        self._is_transactional = transactional

    @property
    def producer_id(self) -> int:
        return self._producer_id

    @property
    def producer_epoch(self) -> int:
        return self._producer_epoch

    @property
    def has_sequence(self) -> bool:
        return self._sequence != -1

    def close(self) -> None:
        if self._buffer is not None:
            return
        buf = bytearray(_HEADER.size)
        _HEADER.pack_into(
            buf,
            0,
            0,  # base offset: the broker's
            self._size - 12,  # length after this field
            0,  # partition leader epoch: the broker's
            2,  # magic
            0,  # CRC, below
            _TRANSACTIONAL if self._is_transactional else 0,
            self._count - 1,  # last offset delta
            self._first_ts,
            self._max_ts,
            self._producer_id,
            self._producer_epoch,
            self._sequence,
            self._count,
        )
        buf += b"".join(self._chunks)
        self._chunks = []
        struct.pack_into(">I", buf, _CRC_AT, crc32c(memoryview(buf)[_ATTRIBUTES_AT:]))
        self._buffer = bytes(buf)

    def buffer(self) -> bytes:
        assert self._buffer is not None
        return self._buffer

    def records(self) -> Any:
        from kafka.record.memory_records import MemoryRecords

        return MemoryRecords(self.buffer())


def encode_records(
    messages: Sequence[tuple[bytes | None, bytes | None]], first_delta: int, ts_delta: int, out: list[bytes]
) -> int:
    """Append the v2 encoding of ``messages`` (``(key, value)``, no headers) to ``out``, offset deltas from
    ``first_delta``, all with timestamp delta ``ts_delta``; returns the bytes added."""
    prefix = b"\x00" + varint(ts_delta)  # attributes, timestamp delta
    varints, null, join, size = _VARINTS, _NULL, b"".join, 0
    append = out.append
    delta = first_delta
    for key, value in messages:
        if key is None:
            k = null
            key = b""
        else:
            k = varints[len(key)] if len(key) < 32768 else _encode_varint(len(key))
        if value is None:
            v = null
            value = b""
        else:
            v = varints[len(value)] if len(value) < 32768 else _encode_varint(len(value))
        body = join(
            (prefix, varints[delta] if delta < 32768 else _encode_varint(delta), k, key, v, value, b"\x00")
        )
        n = len(body)
        head = varints[n] if n < 32768 else _encode_varint(n)
        append(head)
        append(body)
        size += len(head) + n
        delta += 1
    return size


_RECORD_OVERHEAD = 27  # at most, besides key and value: length, attributes, two deltas, two lengths, headers


def append_many(
    producer: Any, tp: Any, messages: Sequence[tuple[bytes | None, bytes | None]], max_record: int
) -> bool:
    """Append ``messages`` to partition ``tp`` in ``producer``'s accumulator, in ``FastBatch``es (filling
    the open one first, under the accumulator's lock for ``tp``). Returns whether the sender should be
    woken (a new or a full batch). A record larger than ``max_record`` bytes raises
    ``MessageSizeTooLargeError`` (as ``KafkaProducer.send`` does) before anything is appended."""
    from kafka.producer.producer_batch import ProducerBatch

    accumulator = producer._accumulator
    batch_size = accumulator.config["batch_size"]
    # upper bounds of the encoded sizes, cumulated: how many records surely fit in a batch's room
    ends = list(
        itertools.accumulate(
            (len(k) if k is not None else 0) + (len(v) if v is not None else 0) + _RECORD_OVERHEAD
            for k, v in messages
        )
    )
    if ends[-1] > max_record:  # one of them may be too large
        sizes = [b - a for a, b in zip([0, *ends], ends, strict=False)]
        if max(sizes) - _RECORD_OVERHEAD + _HEADER.size + 21 > max_record:
            from kafka.errors import MessageSizeTooLargeError

            raise MessageSizeTooLargeError(
                f"a record of {max(sizes) - _RECORD_OVERHEAD} bytes of key and value is larger than the "
                f"maximum request size ({max_record} bytes, max_request_size)"
            )
    wake = False
    start, total = 0, len(messages)
    accumulator._appends_in_progress.increment()
    try:
        while start < total:
            with accumulator._tp_lock(tp):
                dq = accumulator._batches[tp]
                batch = dq[-1] if dq else None
                records = batch.records if batch is not None else None
                if type(records) is not FastBatch or records.room() <= 0:
                    records = FastBatch(batch_size)
                    batch = ProducerBatch(tp, records)
                    dq.append(batch)
                    accumulator._incomplete.add(batch)
                    wake = True
                before = ends[start - 1] if start else 0
                end = bisect.bisect_right(ends, before + records.room(), lo=start)
                if end == start:
                    if records.next_offset():  # full for the next record: it goes into a new batch
                        records.seal()
                        continue
                    end = start + 1  # a record larger than a batch goes alone
                chunk: list[bytes] = []
                ts_delta = records.timestamp_delta(int(time.time() * 1000))
                encode_records(messages[start:end], records.next_offset(), ts_delta, chunk)
                records.append_encoded(b"".join(chunk), end - start)
                batch.last_append = time.time()
                wake = wake or records.is_full()
            start = end
    finally:
        accumulator._appends_in_progress.decrement()
    return wake


# ---- consuming: a batch's records in one loop -------------------------------------------------------------


def read_records(
    buf: bytes, pos: int, end: int, base_offset: int, min_offset: int, topic: str, partition: int, out: list
) -> None:
    """Append ``(topic, partition, offset, key, value)`` for each record of an uncompressed v2 batch whose
    records lie in ``buf[pos:end]`` and whose offset is at least ``min_offset`` (headers and timestamps
    are not read)."""
    z1, z2 = _ZIGZAG1, _ZIGZAG2
    append = out.append
    while pos < end:
        b = buf[pos]  # the record's length
        if b < 0x80:
            length, pos = z1[b], pos + 1
        elif buf[pos + 1] < 0x80:
            length, pos = z2[(buf[pos + 1] << 7) | (b & 0x7F)], pos + 2
        else:
            length, pos = _read_varint(buf, pos)
        rec_end = pos + length
        p = pos + 1  # after the attributes
        if buf[p] < 0x80:  # the timestamp delta, skipped
            p += 1
        elif buf[p + 1] < 0x80:
            p += 2
        else:
            _, p = _read_varint(buf, p)
        b = buf[p]  # the offset delta
        if b < 0x80:
            delta, p = z1[b], p + 1
        elif buf[p + 1] < 0x80:
            delta, p = z2[(buf[p + 1] << 7) | (b & 0x7F)], p + 2
        else:
            delta, p = _read_varint(buf, p)
        b = buf[p]  # the key's length
        if b < 0x80:
            n, p = z1[b], p + 1
        elif buf[p + 1] < 0x80:
            n, p = z2[(buf[p + 1] << 7) | (b & 0x7F)], p + 2
        else:
            n, p = _read_varint(buf, p)
        if n < 0:
            key = None
        else:
            key = buf[p : p + n]
            p += n
        b = buf[p]  # the value's length
        if b < 0x80:
            n, p = z1[b], p + 1
        elif buf[p + 1] < 0x80:
            n, p = z2[(buf[p + 1] << 7) | (b & 0x7F)], p + 2
        else:
            n, p = _read_varint(buf, p)
        if n < 0:
            value = None
        else:
            value = buf[p : p + n]
            p += n
        if p > rec_end or rec_end > end:
            from kafka.errors import CorruptRecordError

            raise CorruptRecordError(f"record at offset {base_offset + delta} overruns its batch")
        offset = base_offset + delta
        if offset >= min_offset:
            append((topic, partition, offset, key, value))
        pos = rec_end


@functools.cache
def fast_partition_records() -> type:
    """A subclass of kafka-python's ``Fetcher.PartitionRecords`` that returns a plain tuple ``(topic,
    partition, offset, key, value)`` per record (headers and timestamps are not read). Set it on one
    consumer's fetcher (``consumer._fetcher.PartitionRecords``); other consumers are untouched."""
    from kafka.consumer.fetcher import READ_COMMITTED, Fetcher
    from kafka.errors import CorruptRecordError

    base = Fetcher.PartitionRecords

    class FastPartitionRecords(base):
        def __init__(self, fetch_offset, tp, records, *args: Any, **kwargs: Any) -> None:
            super().__init__(fetch_offset, tp, records, *args, **kwargs)
            self._pending: list = []
            self._at = 0
            self._after: int | None = None  # the offset after the pending batch
            self._batches = self._unpack_batches(records)

        def _unpack_batches(self, records: Any):
            """``(records, next offset)`` per batch (no records for a skipped batch)."""
            tp = self.topic_partition
            topic, partition = tp.topic, tp.partition
            batch = records.next_batch()
            while batch is not None:
                if batch.magic != 2:  # the legacy formats (brokers before 0.11)
                    if self.check_crcs and not batch.validate_crc():
                        raise CorruptRecordError(f"Record batch for partition {tp} failed crc check")
                    out = [
                        (topic, partition, r.offset, r.key, r.value)
                        for r in batch
                        if r.offset >= self.fetch_offset
                    ]
                    yield out, (out[-1][2] + 1 if out else None)
                    batch = records.next_batch()
                    continue
                data = bytes(batch._buffer)
                if self.check_crcs and crc32c(memoryview(data)[_ATTRIBUTES_AT:]) != batch.crc:
                    raise CorruptRecordError(
                        f"Record batch for partition {tp} at offset {batch.base_offset} failed crc check"
                    )
                self.leader_epoch = batch.leader_epoch
                if self.isolation_level == READ_COMMITTED and batch.has_producer_id():
                    self._consume_aborted_transactions_up_to(batch.last_offset)
                    if self._contains_abort_marker(batch):
                        self.aborted_producer_ids.discard(batch.producer_id)
                    elif self._is_batch_aborted(batch):
                        yield [], batch.next_offset
                        batch = records.next_batch()
                        continue
                if batch.is_control_batch:
                    yield [], batch.next_offset
                    batch = records.next_batch()
                    continue
                out: list = []
                if batch.compression_type:  # kafka-python decompresses
                    for r in batch:
                        if r.offset >= self.fetch_offset:
                            out.append((topic, partition, r.offset, r.key, r.value))
                else:
                    read_records(
                        data,
                        _HEADER.size,
                        len(data),
                        batch.base_offset,
                        self.fetch_offset,
                        topic,
                        partition,
                        out,
                    )
                self.records_read += len(out)
                self.bytes_read += len(data)
                yield out, batch.next_offset
                batch = records.next_batch()

        def take(self, n: int | None = None) -> list:
            self._maybe_raise_next_inline_exception()
            taken: list = []
            want = (1 << 62) if n is None else n
            try:
                while len(taken) < want and self.record_iterator is not None:
                    if self._at >= len(self._pending):
                        nxt = next(self._batches, None)
                        if nxt is None:
                            self.drain()
                            break
                        self._pending, self._after = nxt
                        self._at = 0
                        if not self._pending:
                            if self._after is not None:
                                self.next_fetch_offset = self._after
                            continue
                    k = min(len(self._pending) - self._at, want - len(taken))
                    part = self._pending[self._at : self._at + k]
                    self._at += k
                    taken.extend(part)
                    self.next_fetch_offset = part[-1][2] + 1
                    if self._at >= len(self._pending) and self._after is not None:
                        self.next_fetch_offset = max(self._after, self.next_fetch_offset)
            except Exception as exc:
                if not taken:
                    raise
                self._next_inline_exception = exc
            return taken

    return FastPartitionRecords


__all__ = [
    "FastBatch",
    "append_many",
    "crc32c",
    "crc32c_backend",
    "encode_records",
    "fast_partition_records",
    "install_crc32c",
    "read_records",
    "varint",
]
