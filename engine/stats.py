"""Counters and latency percentiles the engine reports through ``Engine.stats()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


class LatencyWindow:
    """The last ``size`` latencies in seconds (a ring buffer), for percentiles."""

    def __init__(self, size: int = 100_000) -> None:
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0

    def add(self, latencies_s: np.ndarray) -> None:
        size = len(self._buf)
        lat = latencies_s[-size:]
        start = self._n % size
        end = start + len(lat)
        if end <= size:
            self._buf[start:end] = lat
        else:
            split = size - start
            self._buf[start:] = lat[:split]
            self._buf[: end - size] = lat[split:]
        self._n += len(lat)

    def percentiles_ms(self, qs: tuple[float, ...] = (50, 90, 99, 100)) -> list[float]:
        n = min(self._n, len(self._buf))
        if n == 0:
            return [float("nan")] * len(qs)
        return [float(v) * 1e3 for v in np.percentile(self._buf[:n], qs)]

    def clear(self) -> None:
        self._n = 0


@dataclass
class EngineStats:
    """A point-in-time view of the engine. Latencies are from ``submit`` to result, in milliseconds,
    over the most recent events (``step_many`` calls are synchronous and not counted there)."""

    events: int
    batches: int
    steps: int
    mean_batch_size: float
    active_streams: int
    spilled_streams: int
    evictions: int  # all evictions: idle past the TTL, and for capacity
    pending: int
    capacity: int
    state_bytes: int
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    model_version: int
    device: str
    errors: int
    loop_errors: int = 0  # failures outside any one event (a sweep, a bug): the step loop went on
    refused_streams: int = 0  # new streams refused a slot (a limit reached, no stream evictable)
    evictions_for_capacity: int = 0  # streams evicted (also in ``evictions``) to make room under a limit
    refused_ends: int = 0  # ends the model refused (``RefusedEndError``: an over-long utterance)
    finetune: dict[str, Any] | None = None  # the fine-tuning worker's progress, when it runs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
