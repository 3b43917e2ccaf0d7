"""Spoken-digit recognition of audio streams: samples → MFCC (batched across streams) → endpointing →
the recognizer (one engine stream per utterance, its label read at the utterance's end).

``rnnstream transcribe FILE...`` replays files through ``Recognizer`` in 100 ms chunks, as a live source
would deliver them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import soundfile

from connectors.audio import Endpointer, EndpointSettings, MFCCBank, MFCCSettings
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
    """Many audio streams at the model's sample rate in, recognitions out. ``push`` queues samples;
    ``tick`` computes the features of every stream in one call, endpoints them and labels the utterances
    that ended."""

    def __init__(self, model: StreamModel, endpoint: EndpointSettings | None = None) -> None:
        m = model.info.features["mfcc"]
        self.settings = MFCCSettings(
            m["sample_rate"], m["n_mfcc"], m["n_fft"], m["hop_length"], m["n_mels"], m["fmin"], m["fmax"]
        )
        self.labels: list[str] = list(model.info.features["labels"])
        self.engine = Engine(model, max_delay_ms=0)
        self._bank = MFCCBank(self.settings)
        self._endpoint = endpoint or EndpointSettings()
        self._endpointers: dict[Hashable, Endpointer] = {}
        self._utterances = 0

    @property
    def sample_rate(self) -> int:
        return self.settings.sample_rate

    def push(self, stream: Hashable, samples: np.ndarray) -> None:
        """``samples``: float32 mono at ``sample_rate``."""
        if stream not in self._endpointers:
            self._endpointers[stream] = Endpointer(self.settings.n_mels, self._endpoint)
        self._bank.push(stream, samples)

    def tick(self) -> list[Recognition]:
        done = []
        for stream, frames in self._bank.tick().items():
            for u in self._endpointers[stream].push(frames):
                done.append(self._label(stream, u.start, u.end, u.features))
        return done

    def end(self, stream: Hashable) -> list[Recognition]:
        """The stream is over: label the utterance in progress, forget the stream."""
        done = self.tick()
        ep = self._endpointers.pop(stream, None)
        u = ep.flush() if ep is not None else None
        if u is not None:
            done.append(self._label(stream, u.start, u.end, u.features))
        self._bank.drop(stream)
        return done

    def close(self) -> None:
        self.engine.close()

    def _label(self, stream: Hashable, start: int, end: int, features: np.ndarray) -> Recognition:
        self._utterances += 1
        uid = f"utterance-{self._utterances}"
        self.engine.step_many([uid] * len(features), features)
        probs = self.engine.end(uid)
        k = int(np.argmax(probs))
        hop_s = self.settings.hop_length / self.sample_rate
        win_s = self.settings.n_fft / self.sample_rate
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
