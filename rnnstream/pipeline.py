"""The pipeline behind ``rnnstream run``: source → decode → engine → sink, with checkpointed state.

One thread runs ``poll → process → (every interval) checkpoint``; it knows no transport:

- *process*: each message is decoded (any exception → dead letter with the reason; nothing else is
  touched), checked by the optional reading checks (order, duplicates, gaps, flat lines), and stepped
  through the engine in batches (``Engine.step_many``); ``scoring`` turns each message's outputs into
  the document the sink writes (``RawOutputs`` by default: the model's outputs and the input position).
- *checkpoint*: ``Sink.flush`` → ``DeadLetters.flush`` → the changed streams' state rows to the
  ``StateBackend`` → ``StateBackend.save(source positions)`` → ``Source.commit``. For Kafka the rows go
  to a changelog topic and the commit is one transaction holding outputs, dead letters, state and
  offsets (exactly-once); elsewhere the rows and positions go to one local file written atomically,
  then the source is acknowledged (MQTT acks, so unacknowledged readings are redelivered after a crash
  and dropped if the restored state already holds them).
- *partitions*: a partition's streams are restored from the backend before any of its messages is
  processed, and checkpointed and dropped when it is revoked (Kafka rebalances). Sources other than
  Kafka have one partition, 0, assigned when they open.

A stream's checkpointed row is the state layout that wrote it (``engine.snapshot.StateLayout``), its engine
state (float32) and the stages' bookkeeping (float64, ``StreamTable``s): ``StateCodec``. A row of another
layout stops the service naming both; a garbage row is logged and its stream starts afresh.

Backpressure: the loop is synchronous; a sink that blocks pauses polling instead of growing memory.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import orjson
import torch

from connectors.base import (
    CheckpointFailed,
    DeadLetter,
    DeadLetters,
    JsonSink,
    MarkedOutput,
    MarkedSource,
    Message,
    Output,
    Sink,
    Source,
    StateBackend,
)
from connectors.codec import FLOAT32_MAX, Decoded, DecodeError, check_label, decode_feedback
from engine import Engine, EngineSnapshot, RefusedEndError, StreamCapacityError
from engine.runtime import freeze_startup_objects
from engine.snapshot import StateLayout, StateLayoutError, state_layout
from rnnstream.limits import StreamRateLimit
from rnnstream.process import exit_within
from rnnstream.stream_table import StreamDict, StreamTable

if TYPE_CHECKING:
    from rnnstream.forecast import Forecaster

log = logging.getLogger("rnnstream.pipeline")

STALL_S = 60.0
"""A pipeline loop that has not gone round for this long is not alive (``/healthz`` fails)."""
STOP_WITHIN_S = 30.0
"""After SIGTERM/SIGINT the process ends within this many seconds (status 1 if it had to be forced)."""


class MessageDecoder(Protocol):
    """Turns one ``Message`` into a ``Decoded`` event with its stream id, or raises (any exception is a
    dead letter; ``DecodeError``'s text is the reason as it stands)."""

    def decode(self, message: Message) -> Decoded: ...


class Scoring(Protocol):
    """What the sink receives for a batch of messages.

    - ``inputs(ids, xs)``: the model's inputs for events ``xs (N, F) float32`` of ``ids`` (identity, or
      an online normalisation).
    - ``documents(batch, xs, ys, version)``: one document per message of ``batch`` from the inputs as
      decoded ``xs (N, F)`` and the model's outputs ``ys (N, out)``, rows in the batch's order; ``None``
      for a message that gets no output (the frames of an utterance whose label comes at its end).
    - ``table``: per-stream bookkeeping, or ``None``; ``dtype``: the float type it reads decoded values as.
    """

    table: StreamTable | None
    dtype: type

    def inputs(self, ids: list[str], xs: np.ndarray) -> np.ndarray: ...

    def documents(self, batch: Batch, xs: np.ndarray, ys: np.ndarray, version: int) -> list[dict | None]: ...


@runtime_checkable
class EndScoring(Protocol):
    """Optional, for a scoring that also shapes the output of a stream's ``end`` (a many-to-one model's
    answer): ``ended(message, stream_id, y, version)`` with ``y (out,)`` the model's final output; the
    default document is ``{"y", "topic", "partition", "offset", "control", "model_version"}``."""

    def ended(self, message: Message, stream_id: str, y: np.ndarray, version: int) -> dict: ...


class ReadingChecks(Protocol):
    """Checks of timestamped readings (``rnnstream.sensors.ReadingGuard``).

    ``check(stream_id, decoded)`` returns ``(accepted, notices)``: a rejected reading goes to the dead
    letters with the first notice as reason; an accepted one may carry notices (a gap, a flat line), sent
    to the dead letters as ``accepted: ...``. ``reset_wanted`` says the stream's state must restart
    before this reading (a gap, with ``on_gap: reset``)."""

    table: StreamTable | StreamDict

    def check(self, stream_id: str, decoded: Decoded) -> tuple[bool, list[str], bool]: ...

    def counters(self) -> dict[str, int]: ...


@dataclass
class PipelineCounters:
    messages: int = 0
    events: int = 0
    dead_letters: int = 0
    notices: int = 0  # accepted readings reported to the dead letters (gaps, flat lines)
    outputs: int = 0
    checkpoints: int = 0
    restored_streams: int = 0
    rebalances: int = 0
    aborts: int = 0
    labels: int = 0  # feedback labels applied (inline or from a feedback source)
    started: float = field(default_factory=time.monotonic)


@dataclass
class Batch:
    """Data messages waiting to be stepped together. ``chunks`` holds each message's timesteps (a list of
    rows, or an array); ``ids`` the stream id once per timestep; ``items`` ``(message, stream, timesteps,
    decoded)`` per message. ``has_stream(sid)``: whether ``sid`` has timesteps in the batch."""

    ids: list[str] = field(default_factory=list)
    chunks: list[list | np.ndarray] = field(default_factory=list)
    items: list[tuple[Message, str, int, Decoded]] = field(default_factory=list)
    _streams: set[str] = field(default_factory=set)  # the streams of ids[:_seen]
    _seen: int = 0

    def add(self, message: Message, sid: str, decoded: Decoded) -> None:
        xs = decoded.xs
        n = len(xs)
        if n == 1:
            self.ids.append(sid)
        else:
            self.ids.extend([sid] * n)
        self.chunks.append(xs)
        self.items.append((message, sid, n, decoded))

    def has_stream(self, sid: str) -> bool:
        """Built as asked (only control messages ask), so adding a message costs no set insertion."""
        ids = self.ids
        if self._seen < len(ids):
            self._streams.update(ids[self._seen :])
            self._seen = len(ids)
        return sid in self._streams

    @property
    def streams(self) -> set[str]:
        self.has_stream("")
        return self._streams

    def inputs(self, dtype: type) -> np.ndarray:
        """All timesteps stacked: ``(N, F)`` (or ``(N,) int64`` ids)."""
        if all(type(c) is list for c in self.chunks):
            return np.array(list(chain.from_iterable(self.chunks)), dtype=dtype)
        return np.concatenate([np.asarray(c, dtype=dtype) for c in self.chunks])

    def __bool__(self) -> bool:
        return bool(self.items)


class RawOutputs:
    """The default scoring: the model's inputs as decoded, and per message ``{"y": (T, out), "topic",
    "partition", "offset" (the input's position), "model_version"}``."""

    table = None
    dtype = np.float32

    def inputs(self, ids: list[str], xs: np.ndarray) -> np.ndarray:
        return xs

    def documents(self, batch: Batch, xs: np.ndarray, ys: np.ndarray, version: int) -> list[dict]:
        docs = []
        row = 0
        for msg, _sid, n, _dec in batch.items:
            docs.append(
                {
                    "y": ys[row : row + n],
                    "topic": msg.topic,
                    "partition": msg.partition,
                    "offset": msg.position,
                    "model_version": version,
                }
            )
            row += n
        return docs

    def json(self, batch: Batch, ys: np.ndarray, version: int) -> list[bytes] | None:
        """``documents`` as JSON, byte for byte what ``encode_document(doc, "json")`` writes, without
        building them: the outputs' rows serialized at once and cut, each message's fields formatted in.
        ``None`` (use ``documents``) when a message's position or partition is not an int, or the outputs
        are not a 2-D float array."""
        if ys.ndim != 2 or ys.dtype.kind != "f" or not len(ys) or not ys.shape[1]:
            return None
        rows = orjson.dumps(np.ascontiguousarray(ys), option=orjson.OPT_SERIALIZE_NUMPY)[2:-2].split(b"],[")
        if len(rows) != len(ys):
            return None
        tail = b',"model_version":%d}' % version if type(version) is int else None
        if tail is None:
            return None
        heads: dict[str, bytes] = {}
        out = []
        append = out.append
        row = 0
        for msg, _sid, n, _dec in batch.items:
            topic, partition, position = msg.topic, msg.partition, msg.position
            if type(position) is not int or type(partition) is not int:
                return None
            head = heads.get(topic)
            if head is None:
                head = heads[topic] = b']],"topic":' + orjson.dumps(topic) + b',"partition":'
            y = rows[row] if n == 1 else b"],[".join(rows[row : row + n])
            append(b'{"y":[[%b%b%d,"offset":%d%b' % (y, head, partition, position, tail))
            row += n
        return out


class StateCodec:
    """A stream's checkpoint row: the state layout header (``StateLayout.row_header()``: the cell, layers,
    state widths and dtype that wrote it; ``9 + 4 * len(widths)`` bytes), the engine state
    ``sum(widths)`` float32 little-endian, then each stage table's row (float64 little-endian).

    Reading a row:
    - of another layout, or a newer record version: ``StateLayoutError`` naming both layouts. The service
      runs a model that cannot use this state; start it with the model that wrote it, or on a fresh
      changelog topic / checkpoint directory.
    - without the header (written before versioning): loaded when its length fits, as it was then (such a
      row holds no identity to check); the stream's next checkpoint rewrites it with the header.
    - holding the engine state only (written before the stages existed): the stages' initial rows.
    - anything else is garbage: ``decode`` raises ``ValueError``; ``decode_table`` logs it (once per
      restore), counts it (``refused``) and leaves the stream out, so it starts afresh; no other stream
      is touched."""

    def __init__(self, layout: StateLayout, tables: Sequence[StreamTable | StreamDict]) -> None:
        self.layout = layout
        self.header = layout.row_header()
        self.engine_width = sum(layout.widths)
        self.tables = list(tables)
        self.extra_width = sum(t.width for t in self.tables)
        self.initial_extra = np.concatenate([t.initial for t in self.tables]) if self.tables else np.zeros(0)
        self.refused = 0  # garbage rows left out by ``decode_table``

    def encode(self, engine_rows: np.ndarray, stream_ids: Sequence[str]) -> list[bytes]:
        """Rows of ``engine_rows (N, W) float32`` and the tables' rows of ``stream_ids``, each behind the
        header."""
        head, header = np.ascontiguousarray(engine_rows, dtype="<f4"), self.header
        if not self.tables:
            return [header + r.tobytes() for r in head]
        tail = np.ascontiguousarray(np.hstack([t.export(stream_ids) for t in self.tables]), dtype="<f8")
        return [header + h.tobytes() + t.tobytes() for h, t in zip(head, tail, strict=True)]

    def decode(self, rows: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """``(engine (N, W) float32, extra (N, E) float64)``; raises ``StateLayoutError`` for a row of
        another layout, ``ValueError`` for garbage."""
        engine, extra, refused = self._decode(rows)
        if refused:
            raise refused[0][1]
        return engine, extra

    def decode_table(self, table: dict[str, bytes]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``decode`` of a partition's rows ``{stream: row}``: ``(stream ids, engine, extra)`` of the rows
        that load; a garbage row is logged and left out (its stream starts afresh)."""
        ids = list(table)
        engine, extra, refused = self._decode(list(table.values()))
        for i, exc in refused:
            log.warning("state row of stream %r refused (%s): the stream starts afresh", ids[i], exc)
        if not refused:
            return ids, engine, extra
        self.refused += len(refused)
        out = {i for i, _ in refused}
        kept = [i for i in range(len(ids)) if i not in out]
        return [ids[i] for i in kept], engine[kept], extra[kept]

    def _decode(self, rows: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ValueError]]]:
        """Every row decoded: ``(engine (N, W), extra (N, E), [(index, why) of each garbage row]``; rows
        of this layout at full length at once, the others one by one. ``StateLayoutError`` propagates."""
        engine = np.zeros((len(rows), self.engine_width), np.float32)
        extra = np.tile(self.initial_extra, (len(rows), 1))
        h, e = len(self.header), 4 * self.engine_width
        size = h + e + 8 * self.extra_width
        fast = [i for i, row in enumerate(rows) if len(row) == size and row.startswith(self.header)]
        if fast:
            every = len(fast) == len(rows)
            data = b"".join(rows if every else [rows[i] for i in fast])
            table = np.frombuffer(data, np.uint8).reshape(len(fast), size)
            at = slice(None) if every else fast
            engine[at] = table[:, h : h + e].copy().view("<f4")
            extra[at] = table[:, h + e :].copy().view("<f8")
        refused: list[tuple[int, ValueError]] = []
        for i in sorted(set(range(len(rows))).difference(fast)):
            try:
                self._decode_row(rows[i], engine[i], extra[i])
            except StateLayoutError:
                raise
            except ValueError as exc:
                refused.append((i, exc))
        return engine, extra, refused

    def _decode_row(self, row: bytes, engine: np.ndarray, extra: np.ndarray) -> None:
        """One row into ``engine (W,)`` and ``extra (E,)`` (``extra`` untouched by an engine-only row)."""
        body = self._body(row)
        e_bytes, x_bytes = 4 * self.engine_width, 8 * self.extra_width
        if len(body) not in (e_bytes, e_bytes + x_bytes):
            raise ValueError(
                f"state row of {len(row)} bytes, {len(body)} after its header; expected {e_bytes} or "
                f"{e_bytes + x_bytes}"
            )
        engine[:] = np.frombuffer(body, "<f4", self.engine_width)
        if len(body) > e_bytes and self.extra_width:
            extra[:] = np.frombuffer(body, "<f8", self.extra_width, offset=e_bytes)

    def _body(self, row: bytes) -> bytes | memoryview:
        """The row after its header, once the header is checked; a row without one as it is."""
        if row.startswith(self.header):
            return memoryview(row)[len(self.header) :]
        found = StateLayout.from_row(row)
        if found is None:
            return row
        layout, end = found
        layout.check_loads_into(self.layout)
        return memoryview(row)[end:]

    def load_extra(self, stream_ids: Sequence[str], extra: np.ndarray) -> None:
        col = 0
        for t in self.tables:
            t.load(stream_ids, extra[:, col : col + t.width])
            col += t.width


class Pipeline:
    """Runs ``source`` through ``engine`` into ``sink`` until ``stop()``, SIGTERM/SIGINT, or the end of a
    finite source. ``run()`` closes every part when it returns."""

    def __init__(
        self,
        engine: Engine,
        source: Source,
        decoder: MessageDecoder,
        sink: Sink,
        dead_letters: DeadLetters,
        backend: StateBackend,
        scoring: Scoring | None = None,
        checks: ReadingChecks | None = None,
        checkpoint_interval_s: float = 0.2,
        labels_wanted: bool = False,
        rate_limit: StreamRateLimit | None = None,
        forecaster: Forecaster | None = None,
    ) -> None:
        self.engine = engine
        self.forecaster = forecaster  # rnnstream.forecast: "forecasts" in each output document
        self.source = source
        self.decoder = decoder
        self.sink = sink
        self.dead_letters = dead_letters
        self.backend = backend
        self.scoring: Scoring = scoring or RawOutputs()
        self.checks = checks
        self.interval_s = checkpoint_interval_s
        self.labels_wanted = labels_wanted
        self.rate_limit = rate_limit
        self._on_close: list[Callable[[], None]] = []
        tables = [t for t in (checks.table if checks else None, self.scoring.table) if t is not None]
        self.codec = StateCodec(state_layout(engine.model), tables)
        engine.watch_drops()  # streams the engine evicts without spill end here too (_forget_dropped)
        self.counters = PipelineCounters()
        self._rejected: Counter[str] = Counter()  # decode rejections by kind (DecodeError.kind)
        self._stop = threading.Event()
        self._tasks: dict[int, set[str]] = {}  # partition → streams held
        self._dirty: dict[int, set[str]] = {}  # partition → streams changed since the last checkpoint
        self._ended: dict[int, set[str]] = {}  # partition → streams ended since the last checkpoint
        self._pending = 0  # messages processed since the last checkpoint
        self._last_checkpoint = time.monotonic()
        self._deferred = (
            isinstance(source, MarkedSource)
            and isinstance(sink, MarkedOutput)
            and isinstance(dead_letters, MarkedOutput)
        )
        # outputs as JSON straight from the default scoring into a sink that takes JSON (``JsonSink``):
        # no per-message document or ``Output``
        self._json_outputs = (
            type(self.scoring) is RawOutputs and isinstance(sink, JsonSink) and bool(sink.writes_json)
        ) and forecaster is None
        self._in_flight: deque[tuple[list, dict, tuple]] = deque()  # deferred checkpoints, oldest first
        self._to_restore: set[int] = set()
        self._opened = False  # the source is open and its first partitions restored
        self._last_pass = time.monotonic()  # when the loop last went round
        # stream → recent (input position, first step, timesteps), to address feedback by positions
        self._steps_at: dict[str, deque[tuple[int, int, int]]] = {}
        # stream → its end message, the ends of this poll not run yet: run together (``_run_ends``)
        self._ends: dict[str, Message] = {}
        # False for a model whose per-step outputs carry nothing (``models.utterance``): no document per
        # message of frames, only the end's
        self._step_outputs = bool(getattr(engine.model, "step_outputs", True))

    # ---- lifecycle -----------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def add_on_close(self, close: Callable[[], None]) -> None:
        """Also call ``close`` when the pipeline closes (an admin endpoint, say)."""
        self._on_close.append(close)

    def run(self) -> None:
        self._install_signal_handlers()
        try:
            self.source.open(self, self.backend.positions())
            freeze_startup_objects()  # the connectors' clients too (see engine.runtime)
            while not self._stop.is_set():
                self._last_pass = time.monotonic()
                messages = self.source.poll(0.005)
                if self._to_restore:  # before any message of a newly assigned partition is processed
                    self._restore_tasks(sorted(self._to_restore))
                    self._to_restore.clear()
                self._opened = True
                if messages:
                    self._restore_unowned(messages)
                    self._process(messages)
                elif self.source.exhausted:
                    break
                if time.monotonic() - self._last_checkpoint >= self.interval_s:
                    self.checkpoint(wait=False)
                elif self._in_flight:
                    self._complete(wait=False)
            self.checkpoint()
        finally:
            self._close()

    def _close(self) -> None:
        for close in (self.source.close, self.sink.close, self.dead_letters.close, *self._on_close):
            try:
                close()
            except Exception:
                log.exception("while closing")
        self.engine.close()

    def health(self) -> dict[str, object]:
        """For ``/healthz`` and ``/readyz``: ``alive`` (the loop went round in the last ``STALL_S`` seconds
        and the engine's step loop runs), ``ready`` (alive, the source open and its partitions restored,
        not stopping), and the ``reasons`` when either is false."""
        reasons = []
        idle = time.monotonic() - self._last_pass
        if idle > STALL_S:
            reasons.append(f"the pipeline loop has not gone round for {idle:.0f} s")
        if not self.engine.loop_alive:
            reasons.append("the engine's step loop is not running")
        alive = not reasons
        if not self._opened:
            reasons.append("the source is not open yet")
        if self._to_restore:
            reasons.append(f"partitions {sorted(self._to_restore)} are being restored")
        if self._stop.is_set():
            reasons.append("stopping")
        return {"alive": alive, "ready": not reasons, "reasons": reasons, "loop_idle_s": round(idle, 3)}

    def service_counters(self) -> dict[str, float]:
        """Counters for ``/metrics`` and ``/stats``: the pipeline's, decode rejections by kind, the reading
        checks' and the source's own (when it keeps any: serial line errors, MQTT reconnects...)."""
        counts = asdict(self.counters)
        counts.pop("started")
        counts.pop("events")  # the engine's own ``events`` counts them (one metric name, one meaning)
        counts.update({f"rejected_{k}": v for k, v in self._rejected.items()})
        counts["refused_state_rows"] = self.codec.refused
        if self.checks is not None:
            counts.update({f"readings_{k}": v for k, v in self.checks.counters().items()})
        source_counters = getattr(self.source, "counters", None)
        if callable(source_counters):
            counts.update({f"source_{k}": v for k, v in source_counters().items()})
        return {k: float(v) for k, v in counts.items()}

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop after a last checkpoint. A second one while that checkpoint waits (for a
        broker that is down, say) exits at once with status 1, and so does a shutdown still going after
        ``STOP_WITHIN_S``: everything not checkpointed is delivered again on restart."""
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, _frame: object) -> None:
            if self._stop.is_set():
                log.error("second signal %d while stopping: exiting without the last checkpoint", signum)
                os._exit(1)
            self._stop.set()
            exit_within(STOP_WITHIN_S, 1)  # a shutdown that hangs (a broker gone, a stuck thread) ends

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

    # ---- processing ----------------------------------------------------------------------------------
    def _process(self, messages: list[Message]) -> None:
        """Decode, step and answer ``messages`` (each stream's messages in order)."""
        batch = Batch()
        feedback: list[Message] = []
        decode = self.decoder.decode
        # a message of plain timesteps (no control, no label to apply) without per-stream checks or rate
        # limits goes straight into the batch: the loop below, without a call per message
        plain = self.rate_limit is None and self.checks is None
        labels = self.labels_wanted
        ends = self._ends
        ids, chunks, items = batch.ids, batch.chunks, batch.items
        for msg in messages:
            if msg.feedback:
                feedback.append(msg)  # applied after this poll's events
                continue
            try:
                decoded = decode(msg)
            except Exception as exc:
                self._decode_failed(msg, exc)
                continue
            plain_one = plain and decoded.control is None and (decoded.label is None or not labels)
            if plain_one and (not ends or decoded.stream_id not in ends):
                xs = decoded.xs
                n = len(xs)
                if n == 1:
                    ids.append(decoded.stream_id)
                elif n:
                    ids.extend([decoded.stream_id] * n)
                else:
                    continue
                chunks.append(xs)
                items.append((msg, decoded.stream_id, n, decoded))
                continue
            before = batch
            batch = self._process_one(msg, decoded, batch)
            if batch is not before:
                ids, chunks, items = batch.ids, batch.chunks, batch.items
        self._flush(batch)
        self._run_ends()
        for msg in feedback:
            self._feedback(msg)
        self.counters.messages += len(messages)
        self._pending += len(messages)

    def _process_one(self, msg: Message, decoded: Decoded, batch: Batch) -> Batch:
        """One decoded message with checks, a rate limit, a control or a label; returns the batch to go
        on with (a new one after a flush)."""
        sid = decoded.stream_id
        if sid in self._ends:  # its end (and its steps before it) first
            batch = self._flush(batch)
            self._run_ends()
        if self.rate_limit is not None and not self._within_rate(msg, sid, len(decoded.xs)):
            return batch
        if self.checks is not None and len(decoded.xs):
            accepted, notices, reset = self.checks.check(sid, decoded)
            if not accepted:
                self._dead_letter(msg, notices[0])
                return batch
            for note in notices:
                self._notice(msg, note)
            if reset:
                batch = self._flush(batch)
                if not self._start(msg, sid):
                    return batch
        if decoded.label is not None and self.labels_wanted:  # labels this message's timesteps
            try:
                check_label(decoded.label)
            except DecodeError as exc:
                self._dead_letter(msg, f"label: {exc}")
                return batch
            batch.add(msg, sid, decoded)
            batch = self._flush(batch)
            self._apply_label(msg, sid, decoded.label, start=-len(decoded.xs), end=None)
            return batch
        if decoded.control is not None and batch.has_stream(sid):  # its earlier steps go first
            batch = self._flush(batch)
        if decoded.control in ("start", "reset") and not self._start(msg, sid):
            return batch
        if len(decoded.xs):
            batch.add(msg, sid, decoded)
        if decoded.control == "end":
            self._ends[sid] = msg  # after the batch's steps, with the poll's other ends (_run_ends)
        return batch

    def _decode(self, msg: Message) -> Decoded | None:
        """The message's event, or ``None`` after sending it to the dead letters. No exception of any
        type escapes: the reason names it."""
        try:
            return self.decoder.decode(msg)
        except Exception as exc:
            self._decode_failed(msg, exc)
        return None

    def _decode_failed(self, msg: Message, exc: Exception) -> None:
        if isinstance(exc, DecodeError):
            self._rejected[exc.kind] += 1
            self._dead_letter(msg, str(exc))
        else:
            self._rejected["undecodable"] += 1
            self._dead_letter(msg, f"undecodable ({type(exc).__name__}: {exc})"[:1000])

    def _within_rate(self, msg: Message, sid: str, events: int) -> bool:
        """Whether the stream's rate limit lets ``events`` more through; if not, the message is a dead
        letter (``rate_limited``). Controls without events always pass (an end frees resources)."""
        limit = self.rate_limit
        if not events or limit.allow(sid, events, time.monotonic()):
            return True
        self._rejected["rate_limited"] += 1
        self._dead_letter(
            msg, f"rate_limited: stream {sid!r} over {limit.rate:g} events/s (burst {limit.burst:g})"
        )
        return False

    def _dead_letter(self, msg: Message, reason: str) -> None:
        self.counters.dead_letters += 1
        self.dead_letters.write(DeadLetter.of(msg, reason))

    def _notice(self, msg: Message, note: str) -> None:
        self.counters.notices += 1
        self.dead_letters.write(DeadLetter.of(msg, f"accepted: {note}"))

    def _mark_dirty(self, partition: int, sid: str) -> None:
        changed = self._dirty.get(partition)
        if changed is None:
            changed = self._dirty[partition] = set()
        changed.add(sid)

    def _flush(self, batch: Batch) -> Batch:
        """Step the batch's events through the engine and write one output per message; returns a new
        empty batch."""
        if not batch:
            return batch
        engine = self.engine
        if self.forecaster is not None:  # a forecast per message: each stream once per engine step
            parts = self.forecaster.rounds(batch)
            if len(parts) > 1:
                for part in parts:
                    self._flush(part)
                return Batch()
        batch = self._without_refused_streams(batch)
        if not batch:
            return batch
        dtype = np.int64 if engine.model.categorical else self.scoring.dtype
        decoded = self._inputs(batch, dtype)
        if decoded is None:  # a message the engine would refuse: without it (dead letter), then again
            batch = self._without_unusable(batch, dtype)
            if not batch:
                return batch
            decoded = batch.inputs(dtype)
        xs = self.scoring.inputs(batch.ids, decoded)
        if self.labels_wanted:
            self._note_steps(batch)
        ys = engine.step_many(batch.ids, xs)
        self.counters.events += len(xs)
        if not self._step_outputs:  # frames buffered: only the end has an output
            for msg, sid, _n, _dec in batch.items:
                self._mark_dirty(msg.partition, sid)
            return Batch()
        version = engine.model.info.version
        dirty = self._dirty
        if self._json_outputs:
            payloads = self.scoring.json(batch, ys, version)  # type: ignore[attr-defined]
            if payloads is not None:
                pairs = []
                for (msg, sid, _n, _dec), payload in zip(batch.items, payloads, strict=True):
                    changed = dirty.get(msg.partition)
                    if changed is None:
                        changed = dirty[msg.partition] = set()
                    changed.add(sid)
                    key = msg.key
                    pairs.append((key if type(key) is bytes else sid.encode(), payload))
                self.sink.write_json(pairs)  # type: ignore[attr-defined]
                self.counters.outputs += len(pairs)
                return Batch()
        docs = self.scoring.documents(batch, decoded, ys, version)
        if self.forecaster is not None:
            self.forecaster.add(batch.items, docs)
        outputs = []
        for (msg, sid, _n, _dec), doc in zip(batch.items, docs, strict=True):
            changed = dirty.get(msg.partition)
            if changed is None:
                changed = dirty[msg.partition] = set()
            changed.add(sid)
            if doc is not None:
                outputs.append(Output(sid, doc, msg.partition, msg.position))
        self.sink.write(outputs)
        self.counters.outputs += len(outputs)
        return Batch()

    def _without_refused_streams(self, batch: Batch) -> Batch:
        """``batch`` without the messages of new streams the engine has no room for (``max_streams``,
        ``max_state_bytes``, nothing evictable), each a dead letter (``capacity``). Asked before the
        scoring's per-stream tables are touched; the others get their slots now."""
        if not self.engine.limited:  # nothing can be refused: no second pass over the batch's streams
            return batch
        refused = self.engine.admit(list(dict.fromkeys(sid for _, sid, _, _ in batch.items)))  # in order
        if not refused:
            return batch
        kept, gone = Batch(), set(refused)
        for msg, sid, _n, decoded in batch.items:
            if sid in gone:
                self._rejected["capacity"] += 1
                self._dead_letter(msg, f"capacity: no room for new stream {sid!r} (engine limits reached)")
            else:
                kept.add(msg, sid, decoded)
        return kept

    def _inputs(self, batch: Batch, dtype: type) -> np.ndarray | None:
        """The batch's decoded inputs, or ``None`` when one of them is not what the engine takes (wrong
        width, NaN, an id out of range): the decoders refuse such input, so this is a safety net that keeps
        one decoder bug from failing a whole batch (or the loop)."""
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a huge value becomes inf: refused below
                xs = batch.inputs(dtype)
        except (ValueError, TypeError, OverflowError):
            return None
        model = self.engine.model
        if model.categorical:
            ok = xs.ndim == 1 and bool(((xs >= 0) & (xs < model.spec.num_embeddings)).all())
        else:
            ok = xs.ndim == 2 and xs.shape[1] == model.feature_size
            ok = ok and bool(np.isfinite(xs).all()) and bool((np.abs(xs) <= FLOAT32_MAX).all())
        return xs if ok else None

    def _without_unusable(self, batch: Batch, dtype: type) -> Batch:
        """``batch`` without the messages whose inputs ``_inputs`` refuses, each sent to the dead letters."""
        kept = Batch()
        for msg, sid, _n, decoded in batch.items:
            single = Batch()
            single.add(msg, sid, decoded)
            if self._inputs(single, dtype) is None:
                self._rejected["unusable"] += 1
                self._dead_letter(
                    msg, "decoded input the engine cannot take (wrong width, NaN or out of range)"
                )
            else:
                kept.add(msg, sid, decoded)
        return kept

    def _start(self, msg: Message, sid: str) -> bool:
        """(Re)start the stream; ``False`` (the message is a dead letter) if the engine has no room."""
        try:
            self.engine.start(sid)
        except StreamCapacityError as exc:
            self._rejected["capacity"] += 1
            self._dead_letter(msg, f"capacity: no room for new stream {sid!r} ({exc})")
            return False
        if self.scoring.table is not None:
            self.scoring.table.reset([sid])
        self._mark_dirty(msg.partition, sid)
        return True

    def _run_ends(self) -> None:
        """The ends deferred so far (each after its stream's steps), as one ``engine.end_many``: one
        batched ``model.end_output`` (an utterance model runs its whole model once for all of them)."""
        if not self._ends:
            return
        ends = list(self._ends.items())
        self._ends.clear()  # in place: ``_process`` holds it
        sequences = self._decoded_at_end([sid for sid, _ in ends])
        for (sid, msg), final in zip(ends, self.engine.end_many([sid for sid, _ in ends]), strict=True):
            self._end(msg, sid, final, sequences.get(sid))

    def _decoded_at_end(self, stream_ids: list[str]) -> dict[str, np.ndarray]:
        """An encoder-decoder model's decoded sequence (``Engine.decode_many``, ``models.decoder``) of
        each ending stream the engine holds, from the state its end reads; ``{}`` for other models."""
        if getattr(self.engine.model, "decoder", None) is None:
            return {}
        held = [sid for sid in stream_ids if sid in self.engine]
        return dict(zip(held, self.engine.decode_many(held), strict=True))

    def _end(
        self, msg: Message, sid: str, final: np.ndarray | Exception, sequence: np.ndarray | None = None
    ) -> None:
        """A stream's end: its final output ``(out,)`` as a document, or the engine's refusal as a dead
        letter (``RefusedEndError``: the stream ended all the same). ``sequence``: an encoder-decoder's
        decoded sequence, the document's ``"decoded"`` (values ``(L, out)`` or token ids ``(L,)``)."""
        if isinstance(final, Exception):
            self._dead_letter(msg, f"control 'end': {final}")
            if not isinstance(final, RefusedEndError):  # the engine does not hold the stream
                return
        self._forget_stream(sid)
        self._tasks.get(msg.partition, set()).discard(sid)
        self._dirty.get(msg.partition, set()).discard(sid)
        self._ended.setdefault(msg.partition, set()).add(sid)
        if isinstance(final, Exception):
            return
        version = self.engine.model.info.version
        if isinstance(self.scoring, EndScoring):
            doc = self.scoring.ended(msg, sid, final, version)
        else:
            doc = {
                "y": final[None, :],
                "topic": msg.topic,
                "partition": msg.partition,
                "offset": msg.position,
                "control": "end",
                "model_version": version,
            }
        if sequence is not None:
            doc["decoded"] = sequence.tolist()
        self.sink.write([Output(sid, doc, msg.partition, msg.position)])
        self.counters.outputs += 1

    def _forget_stream(self, sid: str) -> None:
        for table in self.codec.tables:
            table.drop([sid])
        self._steps_at.pop(sid, None)

    # ---- fine-tuning labels --------------------------------------------------------------------------
    def _feedback(self, msg: Message) -> None:
        """A feedback record: a label for a span of one stream's steps (bad ones: dead letter)."""
        try:
            sid = msg.key_text()
            if sid is None:
                raise DecodeError("missing key: the record key is the stream id")
            fb = decode_feedback(msg.payload)
        except (DecodeError, UnicodeDecodeError) as exc:
            self._dead_letter(msg, f"feedback: {exc}")
            return
        except Exception as exc:
            self._dead_letter(msg, f"feedback: undecodable ({type(exc).__name__}: {exc})"[:1000])
            return
        if not self.labels_wanted:
            self._dead_letter(msg, "feedback: this service does not fine-tune on labels (finetune.target)")
            return
        start, end = fb.start, fb.end
        if fb.last is not None:
            start, end = -fb.last, None
        elif fb.offsets is not None:
            span = self._steps_of_positions(sid, *fb.offsets)
            if span is None:
                self._dead_letter(
                    msg, f"feedback: offsets {list(fb.offsets)} of {sid!r} are not in recent history"
                )
                return
            start, end = span
        self._apply_label(msg, sid, fb.label, start, end)

    def _apply_label(self, msg: Message, sid: str, label: object, start: int | None, end: int | None) -> None:
        try:
            labelled = self.engine.feedback(sid, check_label(label), start, end)
        except (DecodeError, ValueError) as exc:  # InvalidInputError is a ValueError
            self._dead_letter(msg, f"label: {exc}")
            return
        self.counters.labels += labelled

    def _steps_of_positions(self, sid: str, first: int, last: int) -> tuple[int, int] | None:
        """The stream-local step span of the input messages at positions ``first..last`` (inclusive)."""
        steps = [(s, s + n) for pos, s, n in self._steps_at.get(sid, ()) if first <= pos <= last]
        if not steps:
            return None
        return min(s for s, _ in steps), max(e for _, e in steps)

    def _note_steps(self, batch: Batch) -> None:
        """Remember which stream-local steps each message of ``batch`` is about to take (feedback mode)."""
        tuner = self.engine.finetuner
        assert tuner is not None
        next_step: dict[str, int] = {}
        for msg, sid, n, _dec in batch.items:
            step = next_step.get(sid)
            if step is None:
                step = tuner.buffer.steps_of(sid)
            ring = self._steps_at.get(sid)
            if ring is None:
                ring = self._steps_at[sid] = deque(maxlen=256)
            ring.append((msg.position, step, n))
            next_step[sid] = step + n

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self, wait: bool = True) -> None:
        """Outputs, dead letters, changed states and source positions made durable together.

        With a sink, dead letters and source that can mark what they have written or read (MQTT), and
        ``wait=False``, the checkpoint does not wait for the broker: the changed rows and positions are
        taken now, and saved (then the source acknowledged up to its mark) on a later loop pass, once the
        outputs and dead letters up to their marks are acknowledged. Otherwise it flushes and commits at
        once (for Kafka: one transaction)."""
        self._last_checkpoint = time.monotonic()
        self._forget_dropped()
        if not (self._pending or self._dirty or self._ended):
            if wait and getattr(self.source, "overlaps_commits", False):
                self._settle()  # nothing new, but the last checkpoint may still be committing
        else:
            rows, positions = self._changed_rows(), self.source.positions()
            if self._deferred:
                marks = (self.sink.mark(), self.dead_letters.mark(), self.source.mark())
                self._in_flight.append((rows, positions, marks))
            else:
                self.sink.flush()
                self.dead_letters.flush()
                self._commit(rows, positions, None, wait)
        if self._in_flight:
            self._complete(wait)

    def _forget_dropped(self) -> None:
        """Streams the engine dropped (idle past ``ttl_s``, or evicted for capacity, ``eviction: drop``)
        end here too: their rows are deleted at this checkpoint (so a restart does not bring back a state
        the live process no longer has) and their bookkeeping goes."""
        dropped = self.engine.take_dropped()
        if not dropped:
            return
        gone = {sid for sid in dropped if sid not in self.engine}  # not back since (a new event)
        for partition, sids in chain(self._tasks.items(), self._dirty.items()):
            ended = sids & gone
            if ended:
                sids -= ended
                self._ended.setdefault(partition, set()).update(ended)
        for sid in gone:
            self._forget_stream(sid)

    def _changed_rows(self) -> list[tuple[int, str, bytes | None]]:
        """``(partition, stream, row or None for an ended stream)`` of every stream changed since the
        last checkpoint; starts the next interval."""
        rows: list[tuple[int, str, bytes | None]] = []
        for partition, sids in self._dirty.items():
            self._tasks.setdefault(partition, set()).update(sids)
            self._ended.get(partition, set()).difference_update(sids)  # ended, then started again
            snap = self.engine.snapshot(stream_ids=list(sids))
            if not len(snap):
                continue
            engine_rows = torch.cat(snap.states, dim=1).numpy()
            ids = [str(s) for s in snap.stream_ids]
            rows.extend(
                (partition, sid, row)
                for sid, row in zip(ids, self.codec.encode(engine_rows, ids), strict=True)
            )
        rows.extend((partition, sid, None) for partition, sids in self._ended.items() for sid in sids)
        self._dirty, self._ended, self._pending = {}, {}, 0
        return rows

    def _complete(self, wait: bool) -> None:
        """Save the deferred checkpoints whose outputs and dead letters are acknowledged, oldest first
        (``wait``: all of them, flushing first)."""
        if wait:
            self.sink.flush()
            self.dead_letters.flush()
        while self._in_flight:
            rows, positions, (sink_mark, letters_mark, source_mark) = self._in_flight[0]
            done = self.sink.done(sink_mark) and self.dead_letters.done(letters_mark)
            if not (wait or done):
                return
            self._in_flight.popleft()
            if not self._commit(rows, positions, source_mark):
                return

    def _commit(
        self,
        rows: list[tuple[int, str, bytes | None]],
        positions: dict,
        source_mark: object,
        wait: bool = True,
    ) -> bool:
        """Rows and positions to the backend, then the source committed (up to ``source_mark``). A source
        that overlaps its commits with what follows (Kafka: ``overlaps_commits``) may finish this one
        later unless ``wait``: its failure then fails the next checkpoint, which rolls back to the last
        committed one as any failed checkpoint does."""
        for partition, sid, row in rows:
            self.backend.write(partition, sid, row)
        try:
            self.backend.save(positions)
            if source_mark is not None:
                self.source.commit(source_mark)
            elif getattr(self.source, "overlaps_commits", False):
                self.source.commit(wait=wait)
            else:
                self.source.commit()
        except CheckpointFailed as exc:
            log.warning("checkpoint failed (%s): rolling back to the last one", exc)
            self._rollback()
            return False
        self.counters.checkpoints += 1
        return True

    def _settle(self) -> None:
        """Wait for an overlapped commit to finish (rolling back if it failed)."""
        try:
            self.source.settle()  # type: ignore[attr-defined]
        except CheckpointFailed as exc:
            log.warning("checkpoint failed (%s): rolling back to the last one", exc)
            self._rollback()

    def _rollback(self) -> None:
        """After a failed checkpoint: drop every stream and go back to the committed positions; the loop
        restores the committed state of the partitions still assigned before it processes anything (so a
        rollback inside a revocation or a loss restores nothing that the rebalance takes away)."""
        self.counters.aborts += 1
        self._in_flight.clear()
        for partition, sids in self._dirty.items():  # streams begun since the last checkpoint go too
            self._tasks.setdefault(partition, set()).update(sids)
        self._dirty, self._ended, self._pending = {}, {}, 0  # changes of the streams dropped now
        self._drop_tasks(set(self._tasks))
        self._to_restore.update(self.source.rollback())

    # ---- partitions ----------------------------------------------------------------------------------
    def revoked(self, partitions: list[int]) -> None:
        """Commit everything so far while the partitions are still ours (called inside ``poll``), then drop
        their streams. Under incremental rebalancing only the partitions that move are revoked: the others
        keep serving, their streams in memory."""
        self.counters.rebalances += 1
        try:
            self.checkpoint()
        except Exception:
            log.exception("while partitions were revoked")
            raise
        self._leave(partitions, "revoked")

    def lost(self, partitions: list[int]) -> None:
        """Partitions taken away without a revocation (this process's session expired while it stalled):
        another process may own them already, so nothing of theirs may be committed. The open transaction
        is aborted (every partition goes back to its committed state) and their streams are dropped."""
        if not partitions:  # kafka-python, joining for the first time: nothing held, nothing lost
            return
        self.counters.rebalances += 1
        self._rollback()
        self._leave(partitions, "lost")

    def _leave(self, partitions: list[int], how: str) -> None:
        self._to_restore.difference_update(partitions)
        dropped = self._drop_tasks(set(partitions))
        log.info("%s partitions %s: dropped %d streams", how, partitions, dropped)

    def assigned(self, partitions: list[int]) -> None:
        """Note the partitions; the loop restores their streams right after ``poll`` returns, before
        processing anything (Kafka clients allow no other client's work inside their callbacks)."""
        self._to_restore.update(partitions)

    def _restore_unowned(self, messages: list[Message]) -> None:
        """Messages of a partition whose streams are not loaded (revoked, or never announced) mean the
        source broke its contract; stepping them would start their streams from scratch. Load the
        committed state first: the source's position follows on from the last checkpoint."""
        unowned = {m.partition for m in messages}.difference(self._tasks)
        if unowned:
            log.error("messages of partitions %s arrived without an assignment: restoring first", unowned)
            self._restore_tasks(sorted(unowned))

    def _drop_tasks(self, partitions: set[int]) -> int:
        """Release the streams of ``partitions``; returns how many."""
        dropped = 0
        for p in partitions:
            sids = self._tasks.pop(p, set())
            self.engine.release(list(sids))
            for sid in sids:
                self._forget_stream(sid)
            dropped += len(sids)
        return dropped

    def _restore_tasks(self, partitions: list[int]) -> None:
        """Load the committed states of ``partitions`` not held yet."""
        wanted = sorted(set(partitions) - set(self._tasks))
        tables = self.backend.read(wanted)
        widths = self.engine.model.state_widths()
        restored = 0
        for p in wanted:
            table = tables.get(p, {})
            ids, engine_rows, extra = self.codec.decode_table(table)  # garbage rows left out, logged
            states = list(torch.split(torch.from_numpy(engine_rows), widths, dim=1))
            self.engine.restore(EngineSnapshot(ids, states), replace=False)
            self.codec.load_extra(ids, extra)
            self._tasks[p] = set(ids)
            restored += len(ids)
        self.counters.restored_streams += restored
        log.info("assigned partitions %s: restored %d streams", wanted, restored)
