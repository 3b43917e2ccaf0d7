"""Microphones through sounddevice (PortAudio): one ``Microphone`` per capture device.

PortAudio calls ``_callback`` on its own thread with each block of samples; the callback only copies the
block (mixed down to mono) into a ring buffer and counts what went wrong. ``read()`` hands the samples
that arrived since the last read to ``connectors.audio.AudioSource``, which resamples them to the
model's rate and takes them through the same path as audio files.

Nothing is dropped silently (``counters()``):

- ``overflows``: blocks PortAudio flagged ``input_overflow`` (the device's own buffer ran over: samples
  were lost before they reached us);
- ``dropped_samples``: samples the ring buffer had no room for (the pipeline fell more than
  ``buffer_s`` behind), counted and logged;
- ``behind_ms``: how far the samples received trail the wall clock since the device opened. A sound
  server may hold a backlog for a slow reader instead of flagging an overflow (PulseAudio keeps about
  20 s, then drops what is older without a flag), so this is how such a backlog or loss shows; over
  ``warn_behind_s`` it is logged (at most every 10 s);
- ``lost``: times the device disappeared (the stream stopped with an error, or no block for
  ``stall_s`` seconds while it should be running). ``read()`` then raises ``DeviceLost`` once; the
  source keeps the other streams running and calls ``open()`` again every ``reopen_s`` until the device
  is back (``reopens``).

sounddevice is imported on first ``open()``: PortAudio lists the devices when it is loaded, so a sound
server started by this process (``rnnstream audio up``) must be running before that.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from connectors.audio import DeviceLost

log = logging.getLogger("connectors.microphone")


@dataclass
class MicrophoneCounters:
    overflows: int = 0
    dropped_samples: int = 0
    behind_ms: int = 0
    lost: int = 0
    reopens: int = 0
    open_errors: int = 0
    samples: int = 0


def _sounddevice() -> Any:
    import sounddevice

    return sounddevice


def find_input_device(device: str | int | None) -> tuple[int, dict[str, Any]]:
    """``(index, info)`` of the input device named by ``device``: an index, a name or part of one (as
    sounddevice matches names), or ``None`` for the default input. Raises ``ValueError`` naming the
    input devices there are."""
    sd = _sounddevice()
    try:
        info = sd.query_devices(device, "input")
    except (ValueError, sd.PortAudioError) as exc:
        names = [f"{i}: {d['name']}" for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]
        raise ValueError(f"no input device {device!r} ({exc}); input devices: {names or 'none'}") from exc
    return int(info["index"]), dict(info)


class Microphone:
    """One capture device.

    - ``device``: index, name or part of one (``None``: the default input).
    - ``rate``: the capture rate in Hz (``None``: the device's default; many offer only 44.1/48 kHz).
    - ``block_s``: the callback's block, seconds (10 ms: a frame's hop of delay at most).
    - ``buffer_s``: the ring buffer between the callback and ``read()``, seconds.
    - ``stall_s``: no block for this long while running means the device is gone.
    """

    def __init__(
        self,
        device: str | int | None = None,
        rate: int | None = None,
        block_s: float = 0.01,
        buffer_s: float = 10.0,
        stall_s: float = 1.0,
        name: str | None = None,
    ) -> None:
        self.device = device
        self.name = name or ("mic" if device is None else f"mic:{device}")
        self.rate = rate
        self.block_s = block_s
        self.buffer_s = buffer_s
        self.stall_s = stall_s
        self._counts = MicrophoneCounters()
        self._lock = threading.Lock()
        self._stream: Any = None
        self._ring = np.zeros(0, np.float32)
        self._written = 0  # samples written into the ring, ever
        self._read = 0  # samples read out of it, ever
        self._last_block = 0.0  # time.monotonic() of the last callback
        self._failed: str | None = None  # why the stream ended, from PortAudio's thread
        self._opened_once = False
        self._opened_at = 0.0  # time.monotonic() when the stream started
        self._since_open = 0  # samples received since then
        self._warned = -1e9  # time.monotonic() of the last warning
        self._dropped_seen = 0
        self.warn_behind_s = 1.0

    # ---- lifecycle -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Start capturing. Raises ``DeviceLost`` (with PortAudio's reason) when the device cannot be
        opened."""
        sd = _sounddevice()
        try:
            index, info = find_input_device(self.device)
            rate = int(self.rate or info["default_samplerate"])
            ring = np.zeros(max(int(self.buffer_s * rate), 1), np.float32)
            stream = sd.InputStream(
                device=index,
                samplerate=rate,
                channels=1,
                dtype="float32",
                blocksize=max(int(self.block_s * rate), 1),
                latency="low",
                callback=self._callback,
                finished_callback=self._finished,
            )
        except (ValueError, sd.PortAudioError, OSError) as exc:
            self._counts.open_errors += 1
            raise DeviceLost(f"{self.name}: cannot open: {exc}") from exc
        with self._lock:
            self.rate, self._ring, self._written, self._read = rate, ring, 0, 0
            self._failed, self._last_block = None, time.monotonic()
        self._stream = stream
        stream.start()
        self._opened_at, self._since_open = time.monotonic(), 0
        if self._opened_once:
            self._counts.reopens += 1
        self._opened_once = True
        log.info("%s: capturing from %r at %d Hz", self.name, info["name"], rate)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.abort()  # does not wait for a device that no longer answers
                stream.close()
            except Exception as exc:  # a device already gone
                log.debug("%s: while closing: %s", self.name, exc)

    @property
    def finished(self) -> bool:
        """A microphone never runs out."""
        return False

    @property
    def is_open(self) -> bool:
        return self._stream is not None

    def counters(self) -> dict[str, int]:
        with self._lock:
            return asdict(self._counts)

    # ---- reading -------------------------------------------------------------------------------------
    def read(self) -> np.ndarray:
        """The samples that arrived since the last read, ``(n,) float32`` mono at ``rate``. Raises
        ``DeviceLost`` when the device stopped (then the microphone is closed; ``open()`` again)."""
        if self._stream is None:
            raise DeviceLost(f"{self.name}: not open")
        with self._lock:
            failed = self._failed
            if failed is None and time.monotonic() - self._last_block > self.stall_s:
                failed = f"no audio for {self.stall_s:g} s"
            out = self._take()
        if failed is not None and not len(out):
            self._counts.lost += 1
            self.close()
            raise DeviceLost(f"{self.name}: device lost ({failed})")
        self._since_open += len(out)
        self._check_pace()
        return out

    def _check_pace(self) -> None:
        """Update ``behind_ms``; warn (at most every 10 s) about a backlog or dropped samples."""
        rate = self.rate or 1
        behind = (time.monotonic() - self._opened_at) - self._since_open / rate
        self._counts.behind_ms = max(int(behind * 1000), 0)
        dropped = self._counts.dropped_samples
        if (
            behind > self.warn_behind_s or dropped > self._dropped_seen
        ) and time.monotonic() - self._warned > 10:
            self._warned = time.monotonic()
            log.warning(
                "%s: %.1f s behind the clock, %d samples dropped so far (ring buffer full), %d overflows",
                self.name,
                behind,
                dropped,
                self._counts.overflows,
            )
        self._dropped_seen = dropped

    def _take(self) -> np.ndarray:
        """Everything in the ring, oldest first (under the lock)."""
        n, size = self._written - self._read, len(self._ring)
        start = self._read % size
        first = self._ring[start : min(start + n, size)]
        out = np.concatenate([first, self._ring[: n - len(first)]]) if len(first) < n else first.copy()
        self._read = self._written
        return out

    # ---- PortAudio's thread --------------------------------------------------------------------------
    def _callback(self, indata: np.ndarray, frames: int, _time: Any, status: Any) -> None:
        block = indata[:, 0] if indata.shape[1] == 1 else indata.mean(axis=1)
        with self._lock:
            self._last_block = time.monotonic()
            if status.input_overflow:
                self._counts.overflows += 1
            size = len(self._ring)
            room = size - (self._written - self._read)
            if frames > room:
                self._counts.dropped_samples += frames - room
                block = block[:room]
            start = self._written % size
            head = min(len(block), size - start)
            self._ring[start : start + head] = block[:head]
            self._ring[: len(block) - head] = block[head:]
            self._written += len(block)
            self._counts.samples += len(block)

    def _finished(self) -> None:
        with self._lock:
            if self._failed is None:
                self._failed = "the stream stopped"
