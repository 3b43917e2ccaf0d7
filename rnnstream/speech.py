"""Spoken-digit recognition of audio streams: samples → MFCC (batched across streams) → endpointing →
the recognizer (each utterance's frames stepped while it is spoken, its label read at its end).

- In a pipeline (``rnnstream run``, ``listen``, ``transcribe``): ``connectors.audio.AudioSource`` feeds
  segments, ``RecognitionScoring`` turns each utterance's end into a recognition document.
- In this process: ``Recognizer`` (push samples, tick, read recognitions), what the benchmark drives.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from connectors.audio import AudioDecoder, AudioFrontEnd, AudioSource, EndpointSettings, MFCCSettings, Segment
from connectors.audio_files import AudioFile
from connectors.base import Message, Output
from engine import Engine
from models import StreamModel, load_bundle
from rnnstream.checkpoint import EphemeralState
from rnnstream.digits import ASSET
from rnnstream.pipeline import Batch, Pipeline

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
        self.settings = feature_settings(model)
        self.labels: list[str] = list(model.info.features["labels"])
        self.engine = Engine(model, max_delay_ms=0)
        self.front = AudioFrontEnd(self.settings, endpoint)
        self._started: dict[Hashable, int] = {}  # stream → frame number of its utterance's start
        self._ids: dict[Hashable, int] = {}  # stream → its engine stream id
        self._next_id = itertools.count()
        self._live: set[int] = set()  # engine streams holding state (an utterance in progress)

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
        self.front.close()

    def _apply(self, segments: list[tuple[Hashable, Segment]]) -> list[Recognition]:
        """Runs the segments, each stream's in order, with one ``step_many`` for the frames of every
        stream between two of its controls (a tick holds one or two such runs per stream, so a tick
        costs one or two batched calls, however many streams start or end in it). An utterance's label
        is the output of its last frame's step (what ``Engine.end`` returns); ended and cancelled
        utterances are released together, and a new one starts from the initial state."""
        queues: dict[Hashable, deque[Segment]] = {}
        for stream, seg in segments:
            queues.setdefault(stream, deque()).append(seg)
        done: list[Recognition] = []
        while queues:
            ids: list[int] = []
            rows: list[np.ndarray] = []
            ending: list[tuple[Hashable, Segment, int]] = []  # (stream, its end, its last frame's row)
            released: list[int] = []
            for stream, queue in list(queues.items()):
                sid = self._engine_id(stream)
                seg = queue.popleft()
                if seg.control == "start":
                    if sid in self._live:  # an utterance that never ended: start over
                        self.engine.start(sid)
                    self._started[stream] = seg.first
                elif seg.control == "cancel":
                    released.append(sid)
                    self._started.pop(stream, None)
                added = False  # frames of this stream in this call
                while True:
                    if seg.control != "cancel" and len(seg.frames):
                        ids.extend([sid] * len(seg.frames))
                        rows.append(seg.frames)
                        self._live.add(sid)
                        added = True
                    if seg.control == "end":
                        if sid in self._live:  # else nothing was heard: no label
                            ending.append((stream, seg, len(ids) - 1 if added else -1))
                        released.append(sid)
                        break
                    if not queue or queue[0].control not in (None, "end"):
                        break
                    seg = queue.popleft()
                if not queue:
                    del queues[stream]
            ys = self.engine.step_many(ids, np.concatenate(rows)) if ids else None
            for stream, seg, row in ending:
                if ys is not None and row >= 0:
                    probs = ys[row]
                else:  # its last step was in an earlier call
                    probs = self.engine.end(self._ids[stream])
                    self._live.discard(self._ids[stream])
                done.append(self._label(stream, seg.last, probs))
            self.engine.release([sid for sid in released if sid in self._live])
            self._live.difference_update(released)
        return done

    def _engine_id(self, stream: Hashable) -> int:
        sid = self._ids.get(stream)
        if sid is None:
            sid = self._ids[stream] = next(self._next_id)
        return sid

    def _label(self, stream: Hashable, end: int, probs: np.ndarray) -> Recognition:
        k = int(np.argmax(probs))
        start_s, end_s = utterance_span(self.settings, self._started.pop(stream), end)
        return Recognition(stream, start_s, end_s, self.labels[k], float(probs[k]))


class RecognitionScoring:
    """The pipeline's scoring for audio sources: an utterance's frames get no output; its end gets
    ``{"stream", "start_s", "end_s", "label", "confidence", "model_version", "at"}`` (``start_s``/``end_s``
    from the stream's first sample; ``end_s`` includes the endpointer's hangover; ``at``: Unix time of
    the recognition)."""

    table = None
    dtype = np.float32

    def __init__(self, model: StreamModel) -> None:
        self.labels: list[str] = list(model.info.features["labels"])
        self.settings = feature_settings(model)

    def inputs(self, ids: list[str], xs: np.ndarray) -> np.ndarray:
        return xs

    def documents(self, batch: Batch, xs: np.ndarray, ys: np.ndarray, version: int) -> list[dict | None]:
        return [None] * len(batch.items)

    def ended(self, message: Message, stream_id: str, y: np.ndarray, version: int) -> dict:
        seg = message.payload
        k = int(np.argmax(y))
        start_s, end_s = utterance_span(self.settings, seg.began, seg.last)
        return {
            "stream": stream_id,
            "start_s": start_s,
            "end_s": end_s,
            "label": self.labels[k],
            "confidence": round(float(y[k]), 4),
            "model_version": version,
            "at": round(time.time(), 3),
        }


def utterance_span(s: MFCCSettings, first: int, end: int) -> tuple[float, float]:
    """Seconds from the stream's first sample to the start of frame ``first`` and to the last sample of
    frame ``end - 1`` (frames start every hop and are ``n_fft`` samples long), rounded to 1 ms."""
    hop_s, window_s = s.hop_length / s.sample_rate, s.n_fft / s.sample_rate
    return round(first * hop_s, 3), round((end - 1) * hop_s + window_s, 3)


def feature_settings(model: StreamModel) -> MFCCSettings:
    """The MFCC settings a recognizer bundle was trained on (its ``info.features["mfcc"]``)."""
    m = model.info.features["mfcc"]
    return MFCCSettings(
        m["sample_rate"], m["n_mfcc"], m["n_fft"], m["hop_length"], m["n_mels"], m["fmin"], m["fmax"]
    )


def microphone_device(device: str | int | None) -> str | int | None:
    """The device to capture from: ``device`` as given, or when ``None``, the headless sound server of
    ``rnnstream audio up`` if one runs (its environment is then set for PortAudio, which must not have
    been loaded yet), else ``None`` (the system's default input)."""
    if device is not None:
        return device
    from rnnstream import pulseaudio

    server = pulseaudio.status()
    if server is None:
        return None
    pulseaudio.use_server(server)
    return server.device


class _Collected:
    """An in-memory sink and dead-letter output (``connectors.base.Sink``, ``DeadLetters``)."""

    def __init__(self) -> None:
        self.items: list = []

    def write(self, item: object) -> None:
        self.items.extend(item if isinstance(item, list) else [item])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class FileResult:
    path: Path
    recognitions: list[dict]  # RecognitionScoring's documents
    notes: list[str]
    error: str | None = None


def transcribe(paths: Sequence[Path], bundle: Path = ASSET, speed: float | None = None) -> list[FileResult]:
    """Every file through the audio pipeline at once, one stream each (``AudioFile`` →
    ``AudioSource`` → ``AudioDecoder`` → engine → ``RecognitionScoring``), as fast as possible (or at
    ``speed`` times real pace). A file that cannot be used gets its error and the others go on."""
    model = load_bundle(bundle)
    files = [AudioFile(p, speed, name=f"{i}:{p}") for i, p in enumerate(paths)]
    outputs, letters = _Collected(), _Collected()
    source = AudioSource(list(files), feature_settings(model))
    engine = Engine(model, max_delay_ms=0)
    pipeline = Pipeline(
        engine,
        source,
        AudioDecoder(model.feature_size),
        outputs,
        letters,
        EphemeralState(),
        scoring=RecognitionScoring(model),
        checkpoint_interval_s=3600,
    )
    pipeline.run()
    found: dict[str, list[dict]] = {f.name: [] for f in files}
    for out in outputs.items:
        found[out.stream_id].append(out.doc)
    errors = {letter.key: letter.reason for letter in letters.items}
    rate = feature_settings(model).sample_rate

    def notes(f: AudioFile) -> list[str]:
        resampled = [f"resampled from {f.rate} Hz to {rate} Hz"] if f.rate not in (None, rate) else []
        return f.notes + resampled

    return [FileResult(f.path, found[f.name], notes(f), errors.get(f.name)) for f in files]


class _Recognitions:
    """A sink handing each recognition document to ``on_recognition``."""

    def __init__(self, on_recognition: Callable[[dict], None]) -> None:
        self.on_recognition = on_recognition

    def write(self, outputs: list[Output]) -> None:
        for out in outputs:
            self.on_recognition(out.doc)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def listener(
    device: str | int | None,
    on_recognition: Callable[[dict], None],
    rate: int | None = None,
    bundle: Path = ASSET,
) -> tuple[Pipeline, AudioSource]:
    """A pipeline from one microphone (``device``: name, index, or ``None``: see ``microphone_device``)
    to ``on_recognition(document)``; dead letters (a lost device, refused audio) as JSON lines on
    stderr. ``pipeline.run()`` until ``pipeline.stop()``."""
    from connectors.files import JsonLinesDeadLetters
    from connectors.microphone import Microphone

    model = load_bundle(bundle)
    mic = Microphone(microphone_device(device), rate, name="mic" if device is None else str(device))
    source = AudioSource([mic], feature_settings(model))
    pipeline = Pipeline(
        Engine(model, max_delay_ms=0),
        source,
        AudioDecoder(model.feature_size),
        _Recognitions(on_recognition),
        JsonLinesDeadLetters("-"),
        EphemeralState(),
        scoring=RecognitionScoring(model),
        checkpoint_interval_s=3600,
    )
    return pipeline, source
