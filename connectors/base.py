"""The contracts between connectors and the pipeline (``rnnstream.pipeline``).

Data flows one way: ``Source.poll`` → ``Message`` → decoder → engine → ``Output`` → ``Sink.write``, with
``DeadLetters.write`` beside the decoder. A connector never sees the engine; the pipeline never sees a
transport.

- A **source** hands over raw ``Message``s with their **position** (Kafka offset, MQTT receipt number,
  file row, serial line number) and says which **guarantee** it gives. Its ``partition`` is the unit of
  state ownership: Kafka moves partitions between processes, every other source has one partition (0).
- A **checkpoint** makes the engine state, the sink writes and the source positions durable together,
  as far as the source allows: ``Sink.flush`` → ``DeadLetters.flush`` → ``StateBackend.save`` →
  ``Source.commit``. For Kafka the last step commits one transaction holding all of it.
- A **decoder** turns a message into a ``Decoded`` event or raises; the pipeline turns *any* exception
  into a dead letter with the reason.

``Event`` is the decoded-event type of in-process generators (``connectors.simulated``) that feed an
``Engine`` directly, without a pipeline.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

Control = Literal["start", "reset", "end"]
"""Control events, matching ``Engine.start``, ``Engine.reset`` and ``Engine.end``."""

CONTROLS: tuple[Control, ...] = ("start", "reset", "end")

Guarantee = Literal["exactly-once", "at-least-once", "replayable", "best-effort"]
"""What a source promises after a crash of the process that reads it:

- ``exactly-once``: every message's effect on state and outputs is committed exactly once (Kafka
  transactions; ``read_committed`` consumers see each output once).
- ``at-least-once``: a message not covered by a checkpoint is delivered again; the pipeline drops
  redeliveries by ``(stream, timestamp)`` (MQTT QoS 1 with a persistent session).
- ``replayable``: the source restarts from the position of the last checkpoint (CSV and other files).
- ``best-effort``: what arrived while the process was down is gone (a serial line, a live microphone).
"""


class CheckpointFailed(RuntimeError):
    """A checkpoint could not be made durable (a Kafka transaction was fenced or aborted, ...). The
    pipeline rolls the source back to its last checkpoint and reloads the state committed with it."""


@dataclass(slots=True)
class Message:
    """One input as its source received it, before decoding.

    - ``payload``: what arrived: message bytes (Kafka, MQTT), one text line (serial), one row
      ``dict[str, str]`` (CSV).
    - ``key``: the stream id when the transport carries it (Kafka key bytes, the stream named by an MQTT
      topic, a file's name); ``None`` when the payload names the stream.
    - ``partition``: the unit of state ownership (Kafka partition; 0 for every other source).
    - ``position``: where it sits in that partition (Kafka offset, receipt number, row or line number).
    - ``topic``: where it came from (Kafka or MQTT topic, file path, serial port).
    - ``received``: ``time.monotonic()`` when it arrived (seconds).
    - ``feedback``: a label record for fine-tuning (Kafka feedback topic), not an input event.
    """

    payload: Any
    key: bytes | str | None = None
    partition: int = 0
    position: int = 0
    topic: str = ""
    received: float = 0.0
    feedback: bool = False

    def key_text(self) -> str | None:
        """``key`` as text (strict UTF-8 for bytes); ``None`` when absent."""
        if self.key is None or isinstance(self.key, str):
            return self.key
        return self.key.decode()

    def key_bytes(self) -> bytes | None:
        if self.key is None or isinstance(self.key, bytes):
            return self.key
        return self.key.encode()


@dataclass(slots=True)
class Output:
    """What the pipeline sends for one input message: ``doc`` (JSON-able; numpy arrays allowed) for
    stream ``stream_id``, answering the message at ``partition``/``position``."""

    stream_id: str
    doc: dict[str, Any]
    partition: int = 0
    position: int = 0


class Assignment(Protocol):
    """How a source announces the partitions it reads. ``assigned`` comes before any message of those
    partitions is returned by ``poll``; ``revoked`` is called while they are still owned (the pipeline
    checkpoints and drops their streams inside the call); ``lost`` when they were taken away without a
    revocation (another process may own them already: the pipeline aborts what it has not committed and
    drops their streams, committing nothing)."""

    def assigned(self, partitions: list[int]) -> None: ...

    def revoked(self, partitions: list[int]) -> None: ...

    def lost(self, partitions: list[int]) -> None: ...


@runtime_checkable
class Source(Protocol):
    """Where messages come from.

    - ``open(assignment, resume)``: connect and start; announce partitions through ``assignment`` (now,
      or later from inside ``poll``). ``resume``: the ``positions()`` saved with the last local
      checkpoint (empty on a first run); a source that keeps its own positions (Kafka) ignores it.
    - ``poll(timeout_s)``: the messages that arrived, oldest first per partition (``[]`` after
      ``timeout_s`` seconds without any).
    - ``exhausted``: a finite source (a file) has returned everything; the pipeline then stops.
    - ``positions()``: where a restart resumes, covering every message ``poll`` has returned (JSON-able).
    - ``commit()``: everything returned so far is processed and checkpointed (ack MQTT messages, commit
      the Kafka transaction with the offsets). Raises ``CheckpointFailed``.
    - ``rollback()``: after a failed commit: go back to the last committed position; returns the
      partitions still assigned (their state is reloaded).
    """

    guarantee: Guarantee

    def open(self, assignment: Assignment, resume: Mapping[str, Any]) -> None: ...

    def poll(self, timeout_s: float) -> list[Message]: ...

    @property
    def exhausted(self) -> bool: ...

    def positions(self) -> dict[str, Any]: ...

    def commit(self) -> None: ...

    def rollback(self) -> list[int]: ...

    def close(self) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """Where outputs go. ``write`` takes outputs in order (per stream, in the stream's order) and may
    buffer; ``flush`` makes everything written so far durable or visible; ``close`` flushes and releases."""

    def write(self, outputs: list[Output]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class JsonSink(Protocol):
    """Optional, for a sink that writes documents as JSON (the Kafka sink with ``format: json``):
    ``write_json(pairs)`` takes ``(stream id as UTF-8 bytes, the document as JSON bytes)`` per output, in
    order, as ``write`` would have written them. ``writes_json`` says whether it takes them now. The
    pipeline uses it for its default scoring, which encodes its documents itself without building them
    (a document and an ``Output`` per message cost more than the rest of the message's path)."""

    writes_json: bool

    def write_json(self, pairs: list[tuple[bytes, bytes]]) -> None: ...


@runtime_checkable
class DeadLetters(Protocol):
    """Where rejected input goes, with the reason: a Kafka topic, an MQTT topic or a JSON-lines file."""

    def write(self, letter: DeadLetter) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class MarkedOutput(Protocol):
    """Optional, for a sink or dead-letter output whose writes become durable later (MQTT QoS 1):
    ``mark()`` names everything written so far; ``done(mark)`` says, without waiting, whether all of it
    is acknowledged. With a ``MarkedSource``, the pipeline's checkpoints then do not wait for the broker."""

    def mark(self) -> Any: ...

    def done(self, mark: Any) -> bool: ...


@runtime_checkable
class MarkedSource(Protocol):
    """Optional, for a source that can commit part of what it returned: ``mark()`` names everything
    returned so far; ``commit(mark)`` commits up to it (later messages stay uncommitted)."""

    def mark(self) -> Any: ...

    def commit(self, mark: Any = None) -> None: ...


class StateBackend(Protocol):
    """Where stream states are checkpointed. A state is one opaque row of bytes per stream (engine state
    and the pipeline's per-stream bookkeeping, ``rnnstream.pipeline.StateCodec``).

    - ``read(partitions)``: the committed rows, ``{partition: {stream_id: row}}``.
    - ``write(partition, stream_id, row)``: a changed stream (``None``: the stream ended).
    - ``save(positions)``: make the writes durable with the source's positions (a local file written
      atomically; for Kafka, nothing: the source's ``commit`` commits the transaction holding them).
    - ``positions()``: the positions saved last (``{}`` when none or when the source keeps its own).
    """

    def read(self, partitions: list[int]) -> dict[int, dict[str, bytes]]: ...

    def write(self, partition: int, stream_id: str, row: bytes | None) -> None: ...

    def save(self, positions: Mapping[str, Any]) -> None: ...

    def positions(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True, eq=False)
class Event:
    """One decoded event of one stream, for in-process generators that feed an ``Engine`` directly.

    - ``stream_id``: which stream (``str`` or ``int``, as the engine takes it).
    - ``x``: the input for one timestep: ``(features,) float32`` for a feature model, one ``int`` id for a
      categorical model, ``None`` for a control event.
    - ``position``: where the event sits in its generator (a sequence number...).
    - ``control``: ``None`` for data, else one of ``CONTROLS`` (then ``x`` is ``None``).
    - ``ts``: when the event happened, seconds since the Unix epoch (``None`` when there is no clock).
    - ``label``: ground truth when the generator knows it (a class, a target value, an anomaly flag).

    Equality is identity (``eq=False``): events carry numpy arrays, which do not compare as one bool.
    """

    stream_id: str | int
    x: np.ndarray | int | None
    position: Any = None
    control: str | None = None
    ts: float | None = None
    label: Any = None

    def __post_init__(self) -> None:
        if self.control is not None and self.control not in CONTROLS:
            raise ValueError(f"control must be None or one of {CONTROLS}, got {self.control!r}")

    @property
    def is_control(self) -> bool:
        return self.control is not None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Input that could not be used, kept for inspection instead of crashing.

    - ``raw``: what was received, as received (message bytes, a text line, a CSV row).
    - ``reason``: why, one human-readable line (decode error, bad shape, NaN, out of order...).
    - ``key``: the message key or stream id, when known.
    - ``topic``/``partition``/``position``: where it came from in its source.
    - ``ts``: when it was rejected, seconds since the Unix epoch.
    """

    raw: Any
    reason: str
    key: bytes | str | None = None
    topic: str = ""
    partition: int = 0
    position: Any = None
    ts: float = field(default_factory=time.time)

    @classmethod
    def of(cls, message: Message, reason: str) -> DeadLetter:
        return cls(message.payload, reason, message.key, message.topic, message.partition, message.position)

    def document(self) -> dict[str, Any]:
        """The dead letter as a JSON-able document (``json_safe``): ``{"reason", "key", "topic",
        "partition", "position", "ts", "raw"}``; what file and MQTT dead-letter outputs write."""
        return json_safe(
            {
                "reason": self.reason,
                "key": self.key,
                "topic": self.topic,
                "partition": self.partition,
                "position": self.position,
                "ts": self.ts,
                "raw": self.raw,
            }
        )


def json_safe(value: Any) -> Any:
    """``value`` in a form every JSON writer takes: bytes as UTF-8 text, or ``{"base64": ...}`` when they
    are not UTF-8; text that UTF-8 cannot carry (lone surrogates) with backslash escapes; dict keys as
    text (``None`` as ``"null"``); containers element by element; integers beyond 64 bits as text; numpy
    values as they are; anything else as its ``repr``."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode()}
    if isinstance(value, str):
        try:
            value.encode()
            return value
        except UnicodeEncodeError:
            return value.encode(errors="backslashreplace").decode()
    if isinstance(value, dict):
        return {("null" if k is None else str(json_safe(k))): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)  # beyond what JSON readers take as an integer
    if value is None or isinstance(value, bool | int | float | np.generic | np.ndarray):
        return value
    return repr(value)
