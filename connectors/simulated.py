"""Synthetic sensor streams: the default job of ``rnnstream demo`` and the demo model's training data.

Each stream ``s`` has, per feature ``f``, a noisy sine sampled once per event:

    value[t] = offset + amplitude * sin(2π * freq * t + phase) + noise * N(0, 1)   (+ spike, rarely)

with ``t`` the stream's own sample index (0, 1, 2... counted per stream), ``freq`` in cycles per sample,
values in arbitrary sensor units (roughly -4..4, spikes aside). With probability ``anomaly_prob`` an
event gets a spike of ``±U(1, 2) * spike_scale * amplitude`` added to every feature and is labelled
``True``; the spike is one sample long and does not change the underlying signal.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same streams, the
same interleaving and the same values (timestamps aside).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from connectors.base import Event

FREQ_RANGE = (0.01, 0.08)
"""Sine frequency, cycles per sample (periods of 12.5 to 100 samples)."""
AMPLITUDE_RANGE = (0.5, 2.0)
OFFSET_RANGE = (-1.0, 1.0)
NOISE_RANGE = (0.02, 0.1)
"""Standard deviation of the Gaussian measurement noise, sensor units."""
SPIKE_RANGE = (1.0, 2.0)
"""Spike size in multiples of ``spike_scale * amplitude``."""


@dataclass(frozen=True)
class SensorParams:
    """The fixed parameters of ``num_streams`` streams, each array ``(num_streams, features)`` float64."""

    freq: np.ndarray
    phase: np.ndarray
    amplitude: np.ndarray
    offset: np.ndarray
    noise: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, num_streams: int, features: int) -> SensorParams:
        shape = (num_streams, features)
        return cls(
            freq=rng.uniform(*FREQ_RANGE, shape),
            phase=rng.uniform(0.0, 2 * np.pi, shape),
            amplitude=rng.uniform(*AMPLITUDE_RANGE, shape),
            offset=rng.uniform(*OFFSET_RANGE, shape),
            noise=rng.uniform(*NOISE_RANGE, shape),
        )

    @property
    def num_streams(self) -> int:
        return self.freq.shape[0]

    @property
    def features(self) -> int:
        return self.freq.shape[1]

    def reading(self, ids: np.ndarray, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Spike-free readings (sine + noise) of streams ``ids`` at their sample indices ``t`` (both
        ``(n,)`` ints): ``(n, features) float64``."""
        angle = 2 * np.pi * self.freq[ids] * t[:, None].astype(np.float64) + self.phase[ids]
        values = self.offset[ids] + self.amplitude[ids] * np.sin(angle)
        return values + self.noise[ids] * rng.standard_normal(values.shape)

    def spikes(
        self, ids: np.ndarray, rng: np.random.Generator, anomaly_prob: float, spike_scale: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which of ``n`` events get a spike and its size: ``(spiked (n,) bool, spike (n, features))``."""
        spiked = rng.random(len(ids)) < anomaly_prob
        spike = np.zeros((len(ids), self.features))
        k = np.flatnonzero(spiked)
        if len(k):
            size = rng.uniform(*SPIKE_RANGE, len(k)) * rng.choice([-1.0, 1.0], len(k)) * spike_scale
            spike[k] = size[:, None] * self.amplitude[ids[k]]
        return spiked, spike


def occurrence_rank(ids: np.ndarray) -> np.ndarray:
    """For each position of ``ids (n,)``, how many earlier positions hold the same id: ``(n,) int64``."""
    n = len(ids)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    is_first = np.ones(n, dtype=bool)
    is_first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    positions = np.arange(n)
    group_start = np.maximum.accumulate(np.where(is_first, positions, 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = positions - group_start
    return rank


class SimulatedSensors:
    """A ``Source`` of ``num_streams`` synthetic sensor streams (see the module docstring).

    - ``rate_hz``: target total events per second over all streams; ``None`` = as fast as possible.
    - ``seed``: the same seed gives the same events in the same order.
    - ``features``: values per event, each an independent sine (``Event.x`` is ``(features,) float32``).
    - ``anomaly_prob``: chance an event carries a spike (``Event.label`` is then ``True``, else ``False``).
    - ``max_events``: stop after this many events (``None``: run until ``close()``).

    Streams are ``int`` ids ``0..num_streams-1``; each event picks its stream uniformly at random, so
    streams interleave randomly while each stream's samples come in order. ``Event.position`` is the
    event's global sequence number (``int`` from 0), in the single partition ``PARTITION``.
    Iterating again continues where the previous iteration stopped.
    """

    PARTITION = "simulated"

    def __init__(
        self,
        num_streams: int,
        rate_hz: float | None = None,
        seed: int = 0,
        features: int = 1,
        anomaly_prob: float = 0.002,
        spike_scale: float = 1.0,
        max_events: int | None = None,
        chunk: int = 4096,
    ) -> None:
        if num_streams < 1 or features < 1 or chunk < 1:
            raise ValueError("num_streams, features and chunk must be >= 1")
        if rate_hz is not None and rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0 or None, got {rate_hz}")
        if not 0.0 <= anomaly_prob <= 1.0:
            raise ValueError(f"anomaly_prob must be in [0, 1], got {anomaly_prob}")
        param_seq, event_seq = np.random.SeedSequence(seed).spawn(2)
        self.params = SensorParams.draw(np.random.default_rng(param_seq), num_streams, features)
        self._rng = np.random.default_rng(event_seq)
        self.num_streams = num_streams
        self.features = features
        self.rate_hz = rate_hz
        self.anomaly_prob = anomaly_prob
        self.spike_scale = spike_scale
        self.max_events = max_events
        self.chunk = chunk
        self.steps = np.zeros(num_streams, dtype=np.int64)
        """Samples generated so far per stream, ``(num_streams,) int64``; iteration generates a chunk at a
        time, so this runs up to ``chunk`` events ahead of what it has yielded."""
        self.generated = 0
        self.committed: dict[str, Any] = {}
        self._closed = False

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self) -> Iterator[Event]:
        """Yield events until ``max_events`` or ``close()``, paced to ``rate_hz`` when it is set."""
        pace = _Pacer(self.rate_hz)
        while not self._closed and (self.max_events is None or self.generated < self.max_events):
            first = self.generated
            ids, values, spiked = self.next_batch()
            for k, (sid, label) in enumerate(zip(ids.tolist(), spiked.tolist(), strict=True)):
                pace.wait(lambda: self._closed)
                if self._closed:
                    return
                yield Event(sid, values[k], position=first + k, ts=time.time(), label=label)

    def next_batch(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next ``n`` (default ``chunk``) events as arrays, unpaced, for bulk feeding (``step_many``):
        ``(stream_ids (n,) int64, values (n, features) float32, spiked (n,) bool)``."""
        n = self.chunk if n is None else n
        if self.max_events is not None:
            n = max(0, min(n, self.max_events - self.generated))
        ids = self._rng.integers(0, self.num_streams, n)
        t = self.steps[ids] + occurrence_rank(ids)
        np.add.at(self.steps, ids, 1)
        values = self.params.reading(ids, t, self._rng)
        spiked, spike = self.params.spikes(ids, self._rng, self.anomaly_prob, self.spike_scale)
        values = (values + spike).astype(np.float32)
        self.generated += n
        return ids, values, spiked

    def commit(self, positions: Mapping[str, Any]) -> None:
        """Record the last processed positions (``{PARTITION: sequence number}``); nothing to release."""
        self.committed.update(positions)

    def close(self) -> None:
        """Stop iteration (a running ``events()`` returns before its next event)."""
        self._closed = True


class _Pacer:
    """Sleeps so that the ``n``-th call returns no earlier than ``n / rate_hz`` s after the first one.

    It only sleeps once at least 1 ms ahead of schedule, so at high rates events come in bursts of
    about 1 ms worth; ``rate_hz=None`` never sleeps. Long waits (low rates) are cut short by ``stop``.
    """

    def __init__(self, rate_hz: float | None) -> None:
        self.period = None if rate_hz is None else 1.0 / rate_hz
        self.start: float | None = None
        self.n = 0

    def wait(self, stop: Callable[[], bool]) -> None:
        if self.period is None:
            return
        now = time.monotonic()
        if self.start is None:
            self.start = now
        due = self.start + self.n * self.period
        while (ahead := due - now) > 1e-3 and not stop():
            time.sleep(min(ahead, 0.05))
            now = time.monotonic()
        self.n += 1


@dataclass(frozen=True)
class SensorSequences:
    """Whole sequences for training/evaluation, batch-major.

    - ``values``: ``(num_sequences, length, features) float32``, what a sensor reports (spikes included).
    - ``normal``: the same without the spikes: the noisy sine (a forecaster's clean target).
    - ``spiked``: ``(num_sequences, length) bool``, where a spike was injected.
    """

    values: np.ndarray
    normal: np.ndarray
    spiked: np.ndarray


def simulate_sequences(
    num_sequences: int,
    length: int,
    seed: int = 0,
    features: int = 1,
    anomaly_prob: float = 0.002,
    spike_scale: float = 1.0,
) -> SensorSequences:
    """``num_sequences`` independent streams (fresh parameters each), ``length`` samples each from
    ``t = 0``, drawn exactly like ``SimulatedSensors`` draws a stream's samples."""
    param_seq, event_seq = np.random.SeedSequence(seed).spawn(2)
    params = SensorParams.draw(np.random.default_rng(param_seq), num_sequences, features)
    rng = np.random.default_rng(event_seq)
    ids = np.repeat(np.arange(num_sequences), length)
    t = np.tile(np.arange(length), num_sequences)
    normal = params.reading(ids, t, rng)
    spiked, spike = params.spikes(ids, rng, anomaly_prob, spike_scale)
    shape = (num_sequences, length, features)
    return SensorSequences(
        values=(normal + spike).astype(np.float32).reshape(shape),
        normal=normal.astype(np.float32).reshape(shape),
        spiked=spiked.reshape(num_sequences, length),
    )
