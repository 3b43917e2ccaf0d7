"""Audio features for streams: MFCCs computed as samples arrive, equal to librosa's.

For each frame of ``n_fft`` samples (frames start every ``hop_length`` samples, the first at sample 0: no
centring, no padding), with ``w`` the periodic Hann window, ``M`` the Slaney-normalised mel filter bank
(``librosa.filters.mel``) and ``D`` the orthonormal DCT-II:

    P = |rfft(w · frame)|²                  power spectrum,           (n_fft/2 + 1,)
    S = 10 · log10(max(M · P, 1e-10))       mel power in dB, ref 1.0, (n_mels,)
    mfcc = (D · S)[:n_mfcc]                                              (n_mfcc,)

which is ``librosa.feature.mfcc(S=librosa.power_to_db(librosa.feature.melspectrogram(y, sr, n_fft,
hop_length, center=False, n_mels, fmin, fmax), top_db=None), n_mfcc)`` frame by frame. librosa's default
``top_db=80`` clips the dB values at 80 dB below the loudest frame of the *whole* signal, which a stream
cannot know before it ends, so streams are computed without that clip.

``StreamingMFCC`` serves one stream; ``MFCCBank`` many, with one vectorised computation per tick for the
frames completed in all of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import librosa
import numpy as np
import scipy.fft
import scipy.signal

from connectors.base import Assignment, Guarantee, Message
from connectors.codec import Decoded, DecodeError

log = logging.getLogger("connectors.audio")

AMIN = 1e-10  # librosa.power_to_db's floor


@dataclass(frozen=True)
class MFCCSettings:
    """The feature settings; the derived matrices are built once (``window``, ``mel``, ``dct``)."""

    sample_rate: int
    n_mfcc: int = 13
    n_fft: int = 512
    hop_length: int = 160
    n_mels: int = 40
    fmin: float = 0.0
    fmax: float | None = None
    window: np.ndarray = field(init=False, repr=False, compare=False)
    mel: np.ndarray = field(init=False, repr=False, compare=False)
    dct: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.n_fft <= 0 or self.hop_length <= 0:
            raise ValueError("sample_rate, n_fft and hop_length must be positive")
        if not 1 <= self.n_mfcc <= self.n_mels:
            raise ValueError(f"n_mfcc must be in 1..n_mels ({self.n_mels}), got {self.n_mfcc}")
        window = librosa.filters.get_window("hann", self.n_fft, fftbins=True).astype(np.float32)
        mel = librosa.filters.mel(
            sr=self.sample_rate, n_fft=self.n_fft, n_mels=self.n_mels, fmin=self.fmin, fmax=self.fmax
        )
        dct = scipy.fft.dct(np.eye(self.n_mels), type=2, norm="ortho", axis=0)[: self.n_mfcc]
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "mel", np.ascontiguousarray(mel.T, np.float32))  # (bins, n_mels)
        object.__setattr__(self, "dct", np.ascontiguousarray(dct.T, np.float32))  # (n_mels, n_mfcc)


def mfcc_frames(frames: np.ndarray, s: MFCCSettings) -> np.ndarray:
    """MFCCs of ``frames (F, n_fft) float32`` → ``(F, n_mfcc) float32`` (the module's equations)."""
    spectrum = np.fft.rfft(frames * s.window, axis=1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    mel_db = 10.0 * np.log10(np.maximum(power @ s.mel, AMIN))
    return (mel_db @ s.dct).astype(np.float32)


def mfcc_of(signal: np.ndarray, s: MFCCSettings) -> np.ndarray:
    """MFCCs of a whole signal ``(n,)`` at once, ``(frames, n_mfcc)``: what streaming it gives."""
    x = np.asarray(signal, np.float32).reshape(-1)
    if len(x) < s.n_fft:
        return np.zeros((0, s.n_mfcc), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, s.n_fft)[:: s.hop_length]
    return mfcc_frames(np.ascontiguousarray(frames), s)


class _FrameCutter:
    """The samples of one stream not yet used up: cuts complete frames as samples arrive."""

    def __init__(self, s: MFCCSettings) -> None:
        self.s = s
        self._pending = np.zeros(0, np.float32)  # starts at the next frame's first sample

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append ``samples (n,)``; returns the frames they complete, ``(F, n_fft) float32``."""
        x = np.asarray(samples, np.float32).reshape(-1)
        buf = np.concatenate([self._pending, x]) if len(self._pending) else x
        n_fft, hop = self.s.n_fft, self.s.hop_length
        count = 0 if len(buf) < n_fft else 1 + (len(buf) - n_fft) // hop
        if count == 0:
            self._pending = buf.copy()
            return np.zeros((0, n_fft), np.float32)
        frames = np.lib.stride_tricks.sliding_window_view(buf, n_fft)[::hop][:count]
        self._pending = buf[count * hop :].copy()
        return np.ascontiguousarray(frames)


class StreamingMFCC:
    """MFCCs of one stream as its samples arrive: ``push(samples)`` returns the frames completed by them,
    ``(frames, n_mfcc) float32``; a frame comes out as soon as its last sample has arrived."""

    def __init__(
        self,
        sample_rate: int,
        n_mfcc: int = 13,
        n_fft: int = 512,
        hop_length: int = 160,
        n_mels: int = 40,
        fmin: float = 0.0,
        fmax: float | None = None,
    ) -> None:
        self.settings = MFCCSettings(sample_rate, n_mfcc, n_fft, hop_length, n_mels, fmin, fmax)
        self._cutter = _FrameCutter(self.settings)

    @classmethod
    def of(cls, s: MFCCSettings) -> StreamingMFCC:
        return cls(s.sample_rate, s.n_mfcc, s.n_fft, s.hop_length, s.n_mels, s.fmin, s.fmax)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """``samples``: 1-D float32 (any length, 0 included)."""
        return mfcc_frames(self._cutter.push(samples), self.settings)


class MFCCBank:
    """MFCCs of many streams with the same settings: ``push`` queues a stream's samples, ``tick`` computes
    every frame completed since the last tick in one vectorised call."""

    def __init__(self, settings: MFCCSettings) -> None:
        self.settings = settings
        self._cutters: dict[Hashable, _FrameCutter] = {}
        self._ready: dict[Hashable, list[np.ndarray]] = {}

    def push(self, stream: Hashable, samples: np.ndarray) -> None:
        cutter = self._cutters.get(stream)
        if cutter is None:
            cutter = self._cutters[stream] = _FrameCutter(self.settings)
        frames = cutter.push(samples)
        if len(frames):
            self._ready.setdefault(stream, []).append(frames)

    def tick(self) -> Mapping[Hashable, np.ndarray]:
        """Each stream's newly completed frames' MFCCs, ``(frames, n_mfcc) float32``, in order."""
        if not self._ready:
            return {}
        order = list(self._ready)
        blocks = [np.concatenate(self._ready[k]) for k in order]
        self._ready = {}
        features = mfcc_frames(np.concatenate(blocks), self.settings)
        bounds = np.cumsum([0, *(len(b) for b in blocks)])
        return {k: features[bounds[i] : bounds[i + 1]] for i, k in enumerate(order)}

    def drop(self, stream: Hashable) -> None:
        """Forget a stream (its pending samples and unreturned frames)."""
        self._cutters.pop(stream, None)
        self._ready.pop(stream, None)

    def __len__(self) -> int:
        return len(self._cutters)


@dataclass
class EndpointSettings:
    """Energy endpointing with hysteresis, in frames of the features' hop (10 ms at the defaults).

    A frame's level is its mean log-mel energy in dB (``mfcc[0] / sqrt(n_mels)``: the DCT's first
    coefficient is the mel dB values' sum over ``sqrt(n_mels)``). Broadband sound such as speech raises
    it; a narrowband one (a hum, a whistle) barely does, as most bands stay empty. The noise floor
    follows the level down at once and up slowly (``floor_rise_db`` per frame); a sound that goes on for
    ``max_frames``, or whose level stays within ``steady_db`` over its first ``steady_frames`` (a fan
    that starts; speech rises and falls by tens of dB), is dropped and its median level becomes the
    floor. The floor stays above ``floor_min_db``, so that the low noise of a microphone after digital
    silence (a device that just opened) does not count as speech."""

    start_db: float = 12.0  # above the floor: speech may start
    stop_db: float = 8.0  # below floor + this: silence
    stop_below_peak_db: float = 26.0  # or this far below the utterance's loudest frame (5% amplitude)
    min_start: int = 3  # frames above start_db in a row to start
    hangover: int = 8  # silent frames in a row that end an utterance (the label waits this long)
    min_frames: int = 8  # utterances with fewer frames above the silence level (clicks) are dropped
    follow_frames: int = 10  # a sound starting this soon after an utterance ended ...
    follow_min_frames: int = 35  # ... needs this many: it is mostly the word's trailing burst (a "t")
    max_frames: int = 200  # a sound this long is not an utterance but a new noise floor
    pre_roll: int = 10  # frames before the detected start that belong to the utterance
    floor_rise_db: float = 0.05
    floor_start_db: float = -75.0  # the floor before any frame (quiet speakers are near -55 dB)
    floor_min_db: float = -75.0  # the floor never falls below (digital silence is about -100 dB)
    steady_frames: int = 30  # a sound whose level stays within steady_db over its first frames ...
    steady_db: float = 4.0  # ... is a new background (a fan starting), not speech: that much sooner


SegmentControl = Literal["start", "end", "cancel"]


@dataclass
class Segment:
    """A piece of one stream's utterance, in the order the endpointer finds them.

    - ``control``: ``"start"`` (an utterance begins: start the stream, then step ``frames``), ``None``
      (more frames of it), ``"end"`` (step ``frames``, then the utterance is over: read its label) or
      ``"cancel"`` (step nothing more; what began was not speech, a click or a new noise: forget it).
    - ``frames``: ``(T, n_mfcc) float32`` features, ``T >= 0``.
    - ``first``: the stream's frame number of ``frames[0]`` (frames count from the stream's first sample,
      one every hop).
    - ``began``: the frame number where the utterance began (its ``start`` segment's ``first``).
    """

    control: SegmentControl | None
    frames: np.ndarray
    first: int
    began: int = 0

    @property
    def last(self) -> int:
        """The frame number after ``frames``."""
        return self.first + len(self.frames)


class Endpointer:
    """Splits one stream's feature frames into utterances (see ``EndpointSettings``) as they come.

    ``push(frames (F, n_mfcc))`` returns ``Segment``s: an utterance's frames go out as soon as they are
    known to belong to it (from ``min_start`` loud frames on, with ``pre_roll`` frames before them), so a
    recognizer steps them during the speech and only reads the label at the ``end``."""

    def __init__(self, n_mels: int, s: EndpointSettings | None = None) -> None:
        self.s = s or EndpointSettings()
        self._scale = 1.0 / np.sqrt(n_mels)
        self.floor = self.s.floor_start_db
        self.frame = 0  # frames seen
        self._recent: list[np.ndarray] = []  # the last pre_roll + min_start frames, while silent
        self._loud = 0  # loud frames in a row (while silent)
        self._in_speech = False
        self._levels: list[float] = []  # the utterance's frame levels so far (dB)
        self._quiet = 0  # quiet frames in a row (in speech)
        self._peak = -math.inf  # the loudest frame of the utterance in progress
        self._voiced = 0  # its frames above the silence level
        self._none = np.zeros((0, 0), np.float32)  # no frames, of the frames' width once known
        self._began = 0  # the frame number where the utterance in progress began
        self._heard = 0  # its frames from the first loud one on
        self._last_end = -(10**9)  # the frame the last utterance ended at
        self._min_voiced = self.s.min_frames  # voiced frames the utterance in progress needs

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    def push(self, frames: np.ndarray) -> list[Segment]:
        if len(frames):
            self._none = np.zeros((0, frames.shape[1]), np.float32)
        segments: list[Segment] = []
        pending: list[np.ndarray] = []  # frames of the utterance in progress not handed out yet
        for f in frames:
            control = self._step(f)
            if control == "start":
                self._began = self.frame - len(self._recent)
                segments.append(Segment("start", np.stack(self._recent), self._began, self._began))
                self._recent = []
            elif self._in_speech or control == "end":
                pending.append(f)
            if control == "end":
                segments.append(self._segment(control, pending))
            elif control == "cancel":  # none of its frames are wanted
                segments.append(Segment("cancel", self._none, self.frame, self._began))
            if control in ("end", "cancel"):
                pending = []
        if pending:
            segments.append(self._segment(None, pending))
        return segments

    def flush(self) -> list[Segment]:
        """The stream ended: the utterance in progress ends here (or is cancelled when too short)."""
        if not self._in_speech:
            return []
        self._in_speech = False
        return [Segment(self._verdict(), self._none, self.frame, self._began)]

    def cancel(self) -> list[Segment]:
        """Drop the utterance in progress (its audio was cut off): a ``cancel`` segment, or none."""
        if not self._in_speech:
            return []
        self._in_speech = False
        return [Segment("cancel", self._none, self.frame, self._began)]

    def _segment(self, control: SegmentControl | None, frames: list[np.ndarray]) -> Segment:
        block = np.stack(frames) if frames else self._none
        return Segment(control, block, self.frame - len(frames), self._began)

    def _verdict(self) -> SegmentControl:
        if self._voiced < self._min_voiced:
            return "cancel"
        self._last_end = self.frame
        return "end"

    def _step(self, f: np.ndarray) -> str | None:
        """One frame: ``"start"``, ``"end"`` or ``"cancel"`` when the utterance state changes."""
        s = self.s
        level = float(f[0]) * self._scale
        self.frame += 1
        if not self._in_speech:
            self._loud = self._loud + 1 if level > self.floor + s.start_db else 0
            self._recent.append(f)
            del self._recent[: -(s.pre_roll + s.min_start)]
            if self._loud < s.min_start:
                self.floor = max(min(level, self.floor + s.floor_rise_db), s.floor_min_db)
                return None
            self._in_speech, self._quiet, self._peak, self._voiced = True, 0, level, s.min_start
            self._levels = [float(g[0]) * self._scale for g in self._recent]
            self._heard = s.min_start  # frames since the first loud one
            soon = self.frame - self._last_end <= s.follow_frames + s.min_start
            self._min_voiced = s.follow_min_frames if soon else s.min_frames
            return "start"
        self._levels.append(level)
        self._heard += 1
        self._peak = max(self._peak, level)
        quiet = level < max(self.floor + s.stop_db, self._peak - s.stop_below_peak_db)
        self._quiet = self._quiet + 1 if quiet else 0
        self._voiced += not quiet
        # from the frame after the first min_start loud ones on (those may straddle the sound's onset)
        onset = self._levels[len(self._levels) - self._heard + s.min_start :]
        steady = len(onset) == s.steady_frames and max(onset) - min(onset) < s.steady_db
        if steady or len(self._levels) >= s.max_frames:  # not speech: the new background
            self.floor = float(np.median(onset if steady else self._levels))
            self._in_speech, self._loud = False, 0
            return "cancel"
        if self._quiet >= s.hangover:
            self._in_speech, self._loud = False, 0
            return self._verdict()
        return None


class Resampler:
    """One stream's samples from ``rate_in`` to ``rate_out`` Hz, as they arrive.

    The filter is ``scipy.signal.resample_poly``'s: with ``L/M = rate_out/rate_in`` in lowest terms, a
    Kaiser-windowed sinc (β = 5) of ``2·10·max(L, M) + 1`` taps, cut off at ``1/max(L, M)`` of the
    upsampled band, applied polyphase: output ``n`` sits at ``j = n·M`` of the upsampled signal, and

        y[n] = Σ_k h[(j mod L) + k·L] · x[j // L - k]        (x before the first sample: 0)

    It is causal, so ``y`` trails ``resample_poly``'s output (which shifts the filter's delay away) by
    ``delay`` = 10 output samples when downsampling (1.25 ms at 8 kHz): a sample is out as soon as the
    input it needs has arrived, whatever the chunking."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        if rate_in <= 0 or rate_out <= 0:
            raise ValueError(f"rates must be positive, got {rate_in} → {rate_out}")
        g = math.gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        widest = max(self.up, self.down)
        h = scipy.signal.firwin(2 * 10 * widest + 1, 1.0 / widest, window=("kaiser", 5.0)) * self.up
        self.taps = -(-len(h) // self.up)  # input samples each output reads
        h = np.concatenate([h, np.zeros(self.taps * self.up - len(h))])
        phases = h.reshape(self.taps, self.up).T  # (L, K): phase p's taps h[p + k·L]
        self._reversed = np.ascontiguousarray(phases[:, ::-1], np.float32)  # to meet x oldest first
        self.delay = 10 * widest // self.down  # output samples behind resample_poly
        self._history = np.zeros(self.taps - 1, np.float32)  # the last K-1 inputs
        self._inputs = 0  # samples received
        self._outputs = 0  # samples produced

    def push(self, x: np.ndarray) -> np.ndarray:
        """``x (n,) float32`` → the output samples it completes, ``(m,) float32``."""
        x = np.asarray(x, np.float32).reshape(-1)
        last = self._inputs + len(x) - 1  # the newest input index
        end = -(-(last + 1) * self.up // self.down)  # outputs n < end have j // L <= last
        buf = np.concatenate([self._history, x])
        n = np.arange(self._outputs, end)
        j = n * self.down
        first = j // self.up - self._inputs  # buffer row of x[i-K+1 .. i]: rows of K inputs, oldest first
        rows = np.lib.stride_tricks.sliding_window_view(buf, self.taps)
        if self.up == 1:  # decimation: the rows are evenly spaced, one phase
            y = rows[first[0] : first[-1] + 1 : self.down] @ self._reversed[0] if len(n) else n[:0]
        else:
            y = np.einsum("mk,mk->m", rows[first], self._reversed[j % self.up])
        self._history = buf[len(buf) - (self.taps - 1) :]
        self._inputs, self._outputs = last + 1, max(end, self._outputs)
        return y.astype(np.float32)


class AudioFrontEnd:
    """Many audio streams in, utterance segments out; the one path for microphones and files alike.

    Per stream: samples at any rate → ``Resampler`` to ``settings.sample_rate`` (1.25 ms of delay) →
    frames → MFCC → ``Endpointer``. ``push`` queues samples; ``tick`` computes the MFCCs
    of every stream's completed frames in one vectorised call (``MFCCBank``) and endpoints them."""

    def __init__(self, settings: MFCCSettings, endpoint: EndpointSettings | None = None) -> None:
        self.settings = settings
        self.endpoint = endpoint or EndpointSettings()
        self._bank = MFCCBank(settings)
        self._endpointers: dict[Hashable, Endpointer] = {}
        self._resamplers: dict[Hashable, tuple[int, Resampler]] = {}

    def push(self, stream: Hashable, samples: np.ndarray, rate: int | None = None) -> None:
        """``samples``: ``(n,) float32`` mono of ``stream`` at ``rate`` Hz (default: the features' rate)."""
        if stream not in self._endpointers:
            self._endpointers[stream] = Endpointer(self.settings.n_mels, self.endpoint)
        x = np.asarray(samples, np.float32).reshape(-1)
        if rate is not None and rate != self.settings.sample_rate:
            x = self._resampler(stream, rate).push(x)
        self._bank.push(stream, x)

    def tick(self) -> list[tuple[Hashable, Segment]]:
        """The segments found in every stream's frames completed since the last tick, stream by stream."""
        out = []
        for stream, frames in self._bank.tick().items():
            out.extend((stream, seg) for seg in self._endpointers[stream].push(frames))
        return out

    def end(self, stream: Hashable, cut: bool = False) -> list[tuple[Hashable, Segment]]:
        """``stream`` is over: its resampler's tail is pushed, the utterance in progress ends (``cut``: the
        audio was cut off, so it is cancelled instead), the stream is forgotten. Returns ``tick()``'s
        segments (of every stream) and the closing one."""
        rs = self._resamplers.pop(stream, None)
        if rs is not None and not cut:  # the filter's tail: the last input's samples
            self._bank.push(stream, rs[1].push(np.zeros(rs[1].taps, np.float32))[: rs[1].delay])
        out = self.tick()
        ep = self._endpointers.pop(stream, None)
        if ep is not None:
            out.extend((stream, seg) for seg in (ep.cancel() if cut else ep.flush()))
        self._bank.drop(stream)
        return out

    def close(self) -> None:
        """Forget every stream (and release the resamplers)."""
        self._resamplers.clear()
        self._endpointers.clear()
        self._bank = MFCCBank(self.settings)

    def __contains__(self, stream: Hashable) -> bool:
        return stream in self._endpointers

    def __len__(self) -> int:
        return len(self._endpointers)

    def _resampler(self, stream: Hashable, rate: int) -> Resampler:
        held = self._resamplers.get(stream)
        if held is None or held[0] != rate:  # a new stream, or its rate changed (a device reopened)
            held = self._resamplers[stream] = (rate, Resampler(rate, self.settings.sample_rate))
        return held[1]


# ---- the audio source: captures → front end → segments as messages ---------------------------------
class AudioUnusable(ValueError):
    """Audio that cannot be used (an unreadable file, NaN samples), with the reason."""


class Capture(Protocol):
    """Where one stream's samples come from: a microphone (``connectors.microphone``) or a file
    (``connectors.audio_files``).

    - ``name``: the stream id; ``rate``: samples per second (known once open).
    - ``open()``: start; raises ``DeviceLost`` or ``AudioUnusable``.
    - ``read()``: the samples that arrived since the last read, ``(n,) float32`` mono; raises
      ``DeviceLost`` (a device gone: the source reopens it later).
    - ``finished``: everything was read (a file); a microphone never finishes.
    """

    name: str
    rate: int | None

    def open(self) -> None: ...

    def read(self) -> np.ndarray: ...

    @property
    def finished(self) -> bool: ...

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class DeviceLost(RuntimeError):
    """A capture device stopped delivering audio (unplugged, its sound server gone)."""


@dataclass(frozen=True)
class BadAudio:
    """A message payload standing for audio that was refused; the decoder dead-letters it with ``reason``."""

    reason: str


class AudioSource:
    """Audio streams as a pipeline source (``connectors.base.Source``): every capture is one stream; its
    samples go through ``AudioFrontEnd`` (resampled, features batched across streams, endpointed) and
    each ``Segment`` becomes a ``Message`` (payload: the segment; key: the stream; position: the frame
    number of its first frame).

    Guarantee: best-effort. What a microphone captured while the process was down is gone, and a file is
    read from its start again (the front end's state is not checkpointed).

    A capture that fails gives a ``BadAudio`` message (a dead letter with the reason) and the other
    streams go on: a file that cannot be read is skipped; a device that disappears has its utterance in
    progress cancelled and is reopened every ``reopen_s`` seconds until it is back. Blocks holding NaN
    or infinite samples are refused whole."""

    guarantee: Guarantee = "best-effort"

    def __init__(
        self,
        captures: list[Capture],
        settings: MFCCSettings,
        endpoint: EndpointSettings | None = None,
        reopen_s: float = 1.0,
    ) -> None:
        names = [c.name for c in captures]
        if len(set(names)) != len(names):
            raise ValueError(f"two captures share a stream name: {names}")
        self.captures = captures
        self.front = AudioFrontEnd(settings, endpoint)
        self.reopen_s = reopen_s
        self._down: dict[str, float] = {}  # stream → when it last failed to open or was lost
        self._done: set[str] = set()  # finished or unusable captures
        self._frames: dict[str, int] = {}  # stream → frames handed out
        self._refused = 0

    def open(self, assignment: Assignment, resume: Mapping[str, Any]) -> None:
        assignment.assigned([0])
        self._pending: list[Message] = []
        for c in self.captures:
            self._pending.extend(self._open(c))

    def poll(self, timeout_s: float) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        while True:
            messages, self._pending = self._pending + self._gather(), []
            left = deadline - time.monotonic()
            if messages or left <= 0 or self.exhausted:
                return messages
            time.sleep(min(left, 0.005))

    @property
    def exhausted(self) -> bool:
        return len(self._done) == len(self.captures) and not self._pending

    def positions(self) -> dict[str, Any]:
        return dict(self._frames)

    def commit(self) -> None:
        pass

    def rollback(self) -> list[int]:
        return [0]

    def close(self) -> None:
        for c in self.captures:
            c.close()
        self.front.close()

    def counters(self) -> dict[str, int]:
        """Every capture's counters summed (overflows, dropped samples, losses, reopens...), and the
        blocks refused."""
        total: dict[str, int] = {"refused_blocks": self._refused, "streams_down": len(self._down)}
        for c in self.captures:
            for k, v in c.counters().items():
                total[k] = total.get(k, 0) + v
        return total

    # ---- inside ----------------------------------------------------------------------------------------
    def _open(self, c: Capture) -> list[Message]:
        try:
            c.open()
        except DeviceLost as exc:
            if c.name not in self._down:
                log.error("%s (retrying every %g s)", exc, self.reopen_s)
            self._down[c.name] = time.monotonic()
            return []
        except AudioUnusable as exc:
            self._done.add(c.name)
            return [self._bad(c.name, str(exc))]
        if self._down.pop(c.name, None) is not None:
            log.warning("%s: back", c.name)
        return []

    def _gather(self) -> list[Message]:
        """Read every capture, run the front end once, return the segments (and refusals) as messages."""
        messages: list[Message] = []
        ended: list[tuple[str, bool]] = []  # (stream, cut off)
        for c in self.captures:
            if c.name in self._done:
                continue
            if c.name in self._down:
                if time.monotonic() - self._down[c.name] >= self.reopen_s:
                    messages.extend(self._open(c))
                continue
            try:
                x = c.read()
            except DeviceLost as exc:
                log.error("%s: the other streams go on; reopening every %g s", exc, self.reopen_s)
                self._down[c.name] = time.monotonic()
                messages.append(self._bad(c.name, str(exc)))
                ended.append((c.name, True))
                continue
            if len(x) and not np.isfinite(x).all():
                self._refused += 1
                bad = int((~np.isfinite(x)).sum())
                messages.append(
                    self._bad(c.name, f"{bad} of {len(x)} samples NaN or infinite: block refused")
                )
            elif len(x):
                self.front.push(c.name, x, c.rate)
            if c.finished:
                self._done.add(c.name)
                ended.append((c.name, False))
        segments = self.front.tick()
        for name, cut in ended:
            if name in self.front:
                segments.extend(self.front.end(name, cut))
        return messages + [self._message(str(name), seg) for name, seg in segments]

    def _message(self, name: str, seg: Segment) -> Message:
        self._frames[name] = seg.last
        return Message(seg, name, 0, seg.first, name, time.monotonic())

    def _bad(self, name: str, reason: str) -> Message:
        return Message(BadAudio(reason), name, 0, self._frames.get(name, 0), name, time.monotonic())


class AudioDecoder:
    """Turns the ``AudioSource``'s messages into events: a segment's frames ``(T, n_mfcc)`` with its control
    (``cancel`` becomes ``reset``: the stream's state restarts and nothing is output); ``BadAudio`` and
    anything else raise ``DecodeError`` (a dead letter with the reason)."""

    CONTROLS: Mapping[str | None, str | None] = {
        "start": "start",
        None: None,
        "end": "end",
        "cancel": "reset",
    }

    def __init__(self, n_mfcc: int) -> None:
        self.n_mfcc = n_mfcc

    def decode(self, message: Message) -> Decoded:
        seg = message.payload
        if isinstance(seg, BadAudio):
            raise DecodeError(str(seg.reason) or "refused audio", kind="bad_audio")
        if not isinstance(seg, Segment):
            raise DecodeError(f"not an audio segment: {type(seg).__name__}")
        if not (seg.control is None or isinstance(seg.control, str)) or seg.control not in self.CONTROLS:
            raise DecodeError(f"unknown segment control {seg.control!r}"[:200])
        try:
            raw = np.asarray(seg.frames)
            if raw.dtype.kind not in "fiub":
                raise TypeError(f"dtype {raw.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):  # too large: inf, refused below
                frames = raw.astype(np.float32)
        except (TypeError, ValueError, OverflowError) as exc:
            raise DecodeError(f"frames are not real numbers ({exc})"[:200]) from exc
        if frames.size and (frames.ndim != 2 or frames.shape[1] != self.n_mfcc):
            raise DecodeError(f"frames of shape {frames.shape}; expected (T, {self.n_mfcc})")
        if frames.size and not np.isfinite(frames).all():
            raise DecodeError("features NaN or infinite")
        try:
            stream = message.key_text() or ""
        except UnicodeDecodeError as exc:
            raise DecodeError("the stream name is not UTF-8") from exc
        return Decoded(frames if frames.size else [], self.CONTROLS[seg.control], stream_id=stream)
