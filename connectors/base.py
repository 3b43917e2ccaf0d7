"""The interfaces every connector implements: ``Event`` in, ``Source`` produces them, ``Sink`` consumes
``(event, output)`` pairs, ``DeadLetter`` records what could not be turned into an event.

A source knows nothing about the engine and a sink knows nothing about the model: a runner pulls events
from a source, feeds data events to ``Engine.submit``/``step_many`` and control events to
``Engine.start/reset/end``, hands each output to a sink and, once a snapshot covers them, calls
``Source.commit`` with the positions it reached.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

Control = Literal["start", "reset", "end"]
"""Control events, matching ``Engine.start``, ``Engine.reset`` and ``Engine.end``."""

CONTROLS: tuple[Control, ...] = ("start", "reset", "end")


@dataclass(frozen=True, slots=True, eq=False)
class Event:
    """One event of one stream.

    - ``stream_id``: which stream (``str`` or ``int``, as the engine takes it).
    - ``x``: the input for one timestep: ``(features,) float32`` for a feature model, one ``int`` id for a
      categorical model, ``None`` for a control event.
    - ``position``: where the event sits in its source (a Kafka ``(partition, offset)``, a CSV row number,
      a sequence number...); opaque to the engine, handed back through ``Source.commit``.
    - ``control``: ``None`` for data, else one of ``CONTROLS`` (then ``x`` is ``None``).
    - ``ts``: when the event happened, seconds since the Unix epoch (``None`` when the source has no clock).
    - ``label``: ground truth when the source knows it (a class, a target value, an anomaly flag).

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


@runtime_checkable
class Source(Protocol):
    """Where events come from. Iterating (``iter(source)`` or ``source.events()``) yields ``Event``s in
    arrival order, per stream in that stream's time order; iteration ends when the source is exhausted
    or closed.

    ``commit(positions)`` acknowledges that every event up to these positions has been processed and
    is covered by a snapshot, so the source may forget them (commit Kafka offsets, advance a replay
    cursor). ``positions`` maps a partition key (``str``) to the last processed ``Event.position`` in
    that partition: the same dict a runner stores in ``Engine.snapshot(positions=...)``.
    ``close()`` releases the source (connections, files, devices); iteration then stops.
    """

    def __iter__(self) -> Iterator[Event]: ...

    def events(self) -> Iterator[Event]: ...

    def commit(self, positions: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """Where outputs go. ``write(event, output)`` receives each data event with its engine output
    ``(output_size,) float32``, per stream in the stream's order; it may buffer. ``flush()`` makes every
    written output durable/visible; ``close()`` flushes and releases the sink."""

    def write(self, event: Event, output: np.ndarray) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Input a connector could not turn into a usable event, kept for inspection instead of crashing.

    - ``raw``: what was received, as received (message bytes, a CSV row, a decoded object).
    - ``reason``: why it was rejected, one human-readable line (decode error, bad shape, NaN...).
    - ``position``: its position in the source, as ``Event.position``, when known.
    - ``ts``: when it was rejected, seconds since the Unix epoch.
    """

    raw: bytes | object
    reason: str
    position: Any = None
    ts: float = field(default_factory=time.time)
