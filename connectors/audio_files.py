"""Audio files (WAV, FLAC and the other formats libsndfile reads, through soundfile) replayed as streams.

An ``AudioFile`` is a ``connectors.audio.Capture``: one file is one stream, read in ``chunk_s`` pieces at
real pace (``speed=1``), faster (``speed=10``) or as fast as the pipeline takes them (``speed=None``), so
many files are many concurrent streams through the very path a microphone takes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import soundfile

from connectors.audio import MAX_AMPLITUDE, AudioUnusable

MAX_SECONDS = 4 * 3600.0  # a longer file is refused (a hostile header must not make us allocate gigabytes)
MAX_SAMPLES = 2**28  # frames × channels: 1 GiB of float32
MIN_RATE, MAX_RATE = 1000, 384_000  # Hz: what audio hardware records


def load(path: Path) -> tuple[np.ndarray, int, list[str]]:
    """``(samples (n,) float32 mono, rate in Hz, notes)``: a file's audio, its channels averaged; notes say
    what was done or seen (channels mixed down, clipped samples). Raises ``AudioUnusable`` for a file
    that cannot be read, holds no samples (empty, truncated), claims more than ``MAX_SECONDS`` or
    ``MAX_SAMPLES``, has a rate outside ``MIN_RATE..MAX_RATE`` or holds NaN/infinite samples."""
    try:
        with soundfile.SoundFile(path) as f:
            if (
                f.samplerate > 0 and f.frames / f.samplerate > MAX_SECONDS
            ) or f.frames * f.channels > MAX_SAMPLES:
                raise AudioUnusable(f"claims {f.frames} frames of {f.channels} channels: more than we read")
            audio = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, TypeError, MemoryError) as exc:
        raise AudioUnusable(f"cannot read audio: {exc}") from exc
    if audio.size == 0:
        raise AudioUnusable("no samples (empty or truncated file)")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioUnusable(f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
    bad = int((~np.isfinite(audio)).sum())
    if bad:
        raise AudioUnusable(f"{bad} samples are NaN or infinite")
    if np.abs(audio).max() > MAX_AMPLITUDE:
        raise AudioUnusable(f"samples up to {np.abs(audio).max():.3g}: not audio (full scale is 1)")
    notes = []
    if audio.shape[1] > 1:
        notes.append(f"{audio.shape[1]} channels mixed down to mono")
    mono = audio.mean(axis=1, dtype=np.float32)
    if np.abs(mono).max() >= 0.999:
        notes.append("clipped samples")
    return mono, int(rate), notes


class AudioFile:
    """One file as one stream (``name``: default the path as given)."""

    def __init__(
        self, path: Path, speed: float | None = None, chunk_s: float = 0.1, name: str | None = None
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be positive or None, got {speed}")
        self.path = Path(path)
        self.name = name or str(path)
        self.speed = speed
        self.chunk_s = chunk_s
        self.rate: int | None = None
        self.notes: list[str] = []
        self._audio = np.zeros(0, np.float32)
        self._pos = 0
        self._started = 0.0

    def open(self) -> None:
        self._audio, self.rate, self.notes = load(self.path)
        self._pos, self._started = 0, time.monotonic()

    def read(self) -> np.ndarray:
        assert self.rate is not None, "open() first"
        if self.speed is None:
            end = self._pos + max(int(self.chunk_s * self.rate), 1)
        else:
            end = int((time.monotonic() - self._started) * self.speed * self.rate)
        out = self._audio[self._pos : max(end, self._pos)]
        self._pos += len(out)
        return out

    @property
    def finished(self) -> bool:
        return self.rate is not None and self._pos >= len(self._audio)

    @property
    def duration_s(self) -> float:
        return len(self._audio) / self.rate if self.rate else 0.0

    def counters(self) -> dict[str, int]:
        return {"samples": self._pos}

    def close(self) -> None:
        self._audio = np.zeros(0, np.float32)
