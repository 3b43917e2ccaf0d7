"""A per-stream rate limit: a token bucket per stream id.

Each stream may send ``rate`` events (timesteps) per second on average and ``burst`` at once: its bucket
holds up to ``burst`` tokens, refills at ``rate`` tokens/s, and an event costs one token. A message whose
events do not all fit is refused whole (the pipeline turns it into a dead letter, ``rate_limited``), so a
stream that floods cannot starve the others of the step loop; its state is not touched.

Memory: a bucket that has refilled to full holds nothing worth keeping, so buckets untouched for
``burst / rate`` seconds are dropped (a sweep at most once a second): the table holds only the streams
active in the last few seconds, however many streams come and go.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float  # monotonic seconds


class StreamRateLimit:
    """``allow(stream_id, events, now)``: whether ``events`` more events of the stream fit its bucket
    (taken from it if so). ``rate``: events/s per stream (> 0); ``burst``: bucket size, events (≥ 1)."""

    def __init__(self, rate: float, burst: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.refused = 0  # messages refused so far
        self._buckets: dict[str, _Bucket] = {}
        self._swept = float("-inf")

    def allow(self, stream_id: str, events: int, now: float) -> bool:
        """Take ``events`` tokens from the stream's bucket if it holds them. ``now``: monotonic seconds."""
        if now - self._swept >= 1.0:
            self._sweep(now)
        bucket = self._buckets.get(stream_id)
        if bucket is None:
            bucket = self._buckets[stream_id] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if events > bucket.tokens:
            self.refused += 1
            return False
        bucket.tokens -= events
        return True

    def __len__(self) -> int:
        """Streams with a bucket held (those active in the last ``burst / rate`` seconds, about)."""
        return len(self._buckets)

    def _sweep(self, now: float) -> None:
        """Drop the buckets that have refilled to full since they were last used."""
        full_after = self.burst / self.rate
        self._buckets = {s: b for s, b in self._buckets.items() if now - b.updated < full_after}
        self._swept = now
