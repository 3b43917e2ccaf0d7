"""Spoken-digit recognition of audio streams: samples → MFCC (batched across streams) → endpointing →
the recognizer (one engine stream per utterance, its label read at the utterance's end).

``rnnstream transcribe FILE...`` replays files through ``Recognizer`` in 100 ms chunks, as a live source
would deliver them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import soundfile

from connectors.audio import AudioFrontEnd, EndpointSettings, MFCCSettings, Segment
from engine import Engine
from models import StreamModel, load_bundle
from rnnstream.digits import ASSET

CHUNK_S = 0.1


@dataclass(frozen=True)
class Recognition:
    stream: Hashable
    start_s: float  # from the stream's first sample
    end_s: float  # when the endpointer closed the utterance (hangover included)
    label: str
    confidence: float  # the recognizer's probability of the label


class Recognizer:
    """Many audio streams in, recognitions out, in this process. ``push`` queues samples; ``tick`` runs the
    front end (features of every stream in one call, endpointing) and steps every utterance's new frames
    through the engine in one batch, reading the label of each utterance that ended.

    An utterance's frames are stepped while it is spoken, so at its end only the label is left to read."""

    def __init__(self, model: StreamModel, endpoint: EndpointSettings | None = None) -> None:
        m = model.info.features["mfcc"]
        self.settings = MFCCSettings(
            m["sample_rate"], m["n_mfcc"], m["n_fft"], m["hop_length"], m["n_mels"], m["fmin"], m["fmax"]
        )
        self.labels: list[str] = list(model.info.features["labels"])
        self.engine = Engine(model, max_delay_ms=0)
        self.front = AudioFrontEnd(self.settings, endpoint)
        self._started: dict[Hashable, int] = {}  # stream → frame number of its utterance's start
        self._ids: dict[Hashable, int] = {}  # stream → its engine stream id
        self._next_id = itertools.count()

    @property
    def sample_rate(self) -> int:
        return self.settings.sample_rate

    def push(self, stream: Hashable, samples: np.ndarray, rate: int | None = None) -> None:
        """``samples``: ``(n,) float32`` mono at ``rate`` Hz (default ``sample_rate``; others resampled)."""
        self.front.push(stream, samples, rate)

    def tick(self) -> list[Recognition]:
        return self._apply(self.front.tick())

    def end(self, stream: Hashable) -> list[Recognition]:
        """The stream is over: label the utterance in progress, forget the stream."""
        try:
            return self._apply(self.front.end(stream))
        finally:
            self._ids.pop(stream, None)

    def close(self) -> None:
        self.engine.close()

    def _apply(self, segments: list[tuple[Hashable, Segment]]) -> list[Recognition]:
        """Steps the segments' frames, batched across streams; a stream's start or end waits for its
        frames before it in the batch."""
        done: list[Recognition] = []
        ids: list[int] = []
        rows: list[np.ndarray] = []

        def step() -> None:
            if ids:
                self.engine.step_many(list(ids), np.concatenate(rows))
                ids.clear()
                rows.clear()

        for stream, seg in segments:
            sid = self._ids.get(stream)
            if sid is None:
                sid = self._ids[stream] = next(self._next_id)
            if seg.control is not None and sid in ids:
                step()
            if seg.control == "start":
                self.engine.start(sid)
                self._started[stream] = seg.first
            if seg.control == "cancel":
                self.engine.release([sid])
                self._started.pop(stream, None)
                continue
            if len(seg.frames):
                ids.extend([sid] * len(seg.frames))
                rows.append(seg.frames)
            if seg.control == "end":
                step()
                done.append(self._label(stream, seg.last))
        step()
        return done

    def _label(self, stream: Hashable, end: int) -> Recognition:
        probs = self.engine.end(self._ids[stream])
        k = int(np.argmax(probs))
        hop_s = self.settings.hop_length / self.sample_rate
        win_s = self.settings.n_fft / self.sample_rate
        start = self._started.pop(stream)
        return Recognition(
            stream,
            round(start * hop_s, 3),
            round((end - 1) * hop_s + win_s, 3),
            self.labels[k],
            float(probs[k]),
        )


class AudioError(ValueError):
    """A file that cannot be recognised, with the reason."""


def read_audio(path: Path, sample_rate: int) -> tuple[np.ndarray, list[str]]:
    """A file's samples as float32 mono at ``sample_rate``, and notes on what was done to them (mixed
    down, resampled). Raises ``AudioError`` for a file that cannot be read, is empty, or holds NaN/Inf."""
    try:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"cannot read audio: {exc}") from exc
    notes = []
    if audio.size == 0:
        raise AudioError("no samples (empty or truncated file)")
    if not np.isfinite(audio).all():
        raise AudioError(f"{int((~np.isfinite(audio)).sum())} samples are NaN or infinite")
    if audio.shape[1] > 1:
        notes.append(f"{audio.shape[1]} channels mixed down to mono")
    mono = audio.mean(axis=1)
    if rate != sample_rate:
        notes.append(f"resampled from {rate} Hz to {sample_rate} Hz")
        mono = librosa.resample(mono, orig_sr=rate, target_sr=sample_rate)
    if np.abs(mono).max() >= 0.999:
        notes.append("clipped samples")
    return mono.astype(np.float32), notes


@dataclass(frozen=True)
class FileResult:
    path: Path
    recognitions: list[Recognition]
    notes: list[str]
    error: str | None = None


def transcribe(paths: Sequence[Path], bundle: Path = ASSET) -> Iterator[FileResult]:
    """Each file through the recognizer in 100 ms chunks (all files' chunks interleaved, as concurrent
    live streams would arrive); a file that cannot be used gives its error and the others go on."""
    rec = Recognizer(load_bundle(bundle))
    try:
        audio: dict[Path, np.ndarray] = {}
        notes: dict[Path, list[str]] = {}
        for p in paths:
            try:
                audio[p], notes[p] = read_audio(p, rec.sample_rate)
            except AudioError as exc:
                yield FileResult(p, [], [], str(exc))
        chunk = int(CHUNK_S * rec.sample_rate)
        found: dict[Path, list[Recognition]] = {p: [] for p in audio}
        for k in range(max((math.ceil(len(a) / chunk) for a in audio.values()), default=0)):
            for p, a in audio.items():
                if k * chunk < len(a):
                    rec.push(p, a[k * chunk : (k + 1) * chunk])
            for r in rec.tick():
                found[r.stream].append(r)  # type: ignore[index]
            for p, a in audio.items():
                if (k + 1) * chunk >= len(a) > k * chunk:
                    found[p].extend(rec.end(p))
        for p in audio:
            yield FileResult(p, found[p], notes[p])
    finally:
        rec.close()
