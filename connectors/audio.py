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
from typing import Any, ClassVar, Literal, Protocol

import librosa
import numpy as np
import scipy.fft
import scipy.signal
import torch

from connectors.base import Assignment, Guarantee, Message
from connectors.codec import Decoded, DecodeError, refusing

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
    spectrum = torch.fft.rfft(torch.from_numpy(np.ascontiguousarray(frames * s.window)), dim=1)
    power = (spectrum.real.square() + spectrum.imag.square()).numpy()
    mel_db = 10.0 * np.log10(np.maximum(power @ s.mel, AMIN))
    return (mel_db @ s.dct).astype(np.float32)


def mfcc_of(signal: np.ndarray, s: MFCCSettings) -> np.ndarray:
    """MFCCs of a whole signal ``(n,)`` at once, ``(frames, n_mfcc)``: what streaming it gives."""
    x = np.asarray(signal, np.float32).reshape(-1)
    if len(x) < s.n_fft:
        return np.zeros((0, s.n_mfcc), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, s.n_fft)[:: s.hop_length]
    return mfcc_frames(np.ascontiguousarray(frames), s)


def _groups(keys: list[Hashable]) -> dict[Hashable, list[int]]:
    """Positions of equal keys: streams in the same state are computed together."""
    out: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


class _FrameCutter:
    """The samples of one stream not yet used up: cuts complete frames as samples arrive."""

    def __init__(self, s: MFCCSettings) -> None:
        self.s = s
        self.pending = np.zeros(0, np.float32)  # starts at the next frame's first sample

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append ``samples (n,)``; returns the frames they complete, ``(F, n_fft) float32``."""
        return cut_frames([self], [np.asarray(samples, np.float32).reshape(-1)])[0]


def cut_frames(cutters: list[_FrameCutter], chunks: list[np.ndarray]) -> list[np.ndarray]:
    """Each cutter's frames completed by its chunk, ``(F, n_fft)`` views; cutters holding as many pending
    samples and getting as many new ones are cut as one ``(streams, samples)`` array."""
    out: list[np.ndarray] = [np.zeros(0)] * len(cutters)
    for (p, n), idx in _groups(
        [(len(c.pending), len(x)) for c, x in zip(cutters, chunks, strict=True)]
    ).items():
        s = cutters[idx[0]].s
        new = np.stack([chunks[i] for i in idx])
        buf = np.concatenate([np.stack([cutters[i].pending for i in idx]), new], axis=1) if p else new
        count = 0 if p + n < s.n_fft else 1 + (p + n - s.n_fft) // s.hop_length
        if count:
            windows = np.lib.stride_tricks.sliding_window_view(buf, s.n_fft, axis=1)
            frames = windows[:, :: s.hop_length][:, :count]  # (G, count, n_fft)
        else:
            frames = np.zeros((len(idx), 0, s.n_fft), np.float32)
        rest = buf[:, count * s.hop_length :]
        for g, i in enumerate(idx):
            cutters[i].pending, out[i] = rest[g].copy(), frames[g]  # a copy: frees buf
    return out


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
    """MFCCs of many streams with the same settings: ``push`` queues a stream's samples, ``tick`` cuts the
    frames completed since the last tick (``cut_frames``) and computes all of them in one call."""

    def __init__(self, settings: MFCCSettings) -> None:
        self.settings = settings
        self._cutters: dict[Hashable, _FrameCutter] = {}
        self._queued: dict[Hashable, list[np.ndarray]] = {}

    def push(self, stream: Hashable, samples: np.ndarray) -> None:
        if stream not in self._cutters:
            self._cutters[stream] = _FrameCutter(self.settings)
        self._queued.setdefault(stream, []).append(np.asarray(samples, np.float32).reshape(-1))

    def tick(self) -> Mapping[Hashable, np.ndarray]:
        """Each stream's newly completed frames' MFCCs, ``(frames, n_mfcc) float32``, in order."""
        order = list(self._queued)
        if not order:
            return {}
        chunks = [q[0] if len(q) == 1 else np.concatenate(q) for q in self._queued.values()]
        self._queued = {}
        cut = cut_frames([self._cutters[k] for k in order], chunks)
        features = mfcc_frames(np.concatenate(cut), self.settings)
        bounds = np.cumsum([0, *(len(b) for b in cut)])
        return {
            k: features[bounds[i] : bounds[i + 1]] for i, k in enumerate(order) if bounds[i + 1] > bounds[i]
        }

    def drop(self, stream: Hashable) -> None:
        """Forget a stream (its pending samples and unreturned frames)."""
        self._cutters.pop(stream, None)
        self._queued.pop(stream, None)

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
    pre_roll: int = 5  # frames before the detected start that belong to the utterance (50 ms)
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


class Endpointers:
    """The endpointers of many streams (see ``EndpointSettings``), one slot each, their state in arrays:
    each tick's frames are stepped frame by frame, all streams at once.

    ``push({stream: frames (F, n_mfcc)})`` returns each stream's ``Segment``s: an utterance's frames go out
    as soon as they are known to belong to it (from ``min_start`` loud frames on, with ``pre_roll`` frames
    before them), so a recognizer steps them during the speech and only reads the label at the ``end``."""

    _FIELDS: ClassVar[dict[str, type]] = {  # per-slot state: dtype
        "floor": np.float64,  # the noise floor, dB
        "loud": np.int32,  # loud frames in a row (while silent)
        "speech": np.bool_,  # an utterance is in progress
        "quiet": np.int32,  # quiet frames in a row (in speech)
        "voiced": np.int32,  # the utterance's frames above the silence level
        "need": np.int32,  # voiced frames it needs (min_frames, or follow_min_frames right after one)
        "peak": np.float64,  # its loudest frame, dB
        "heard": np.int32,  # its frames from the first loud one on
        "nlev": np.int32,  # its frames so far (levels held)
        "frame": np.int64,  # frames seen
        "began": np.int64,  # the frame number where it began
        "last_end": np.int64,  # the frame number where the last utterance ended
        "ring_n": np.int32,  # frames in the pre-roll ring
    }

    def __init__(self, n_mels: int, s: EndpointSettings | None = None) -> None:
        self.s = s or EndpointSettings()
        self._scale = 1.0 / np.sqrt(n_mels)
        self._ring_size = self.s.pre_roll + self.s.min_start
        self._slots: dict[Hashable, int] = {}
        self._free: list[int] = []
        self._width = 0  # n_mfcc, known at the first frames
        self._grow(16)

    # ---- slots ---------------------------------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        old = getattr(self, "_capacity", 0)
        for name, dtype in self._FIELDS.items():
            arr = np.zeros(capacity, dtype)
            if old:
                arr[:old] = getattr(self, name)
            setattr(self, name, arr)
        levels = np.zeros((capacity, self.s.max_frames), np.float32)  # the utterance's levels
        ring = np.zeros((capacity, self._ring_size, max(self._width, 1)), np.float32)  # the last frames
        ring_lv = np.zeros((capacity, self._ring_size), np.float32)  # and their levels
        if old:
            levels[:old], ring[:old], ring_lv[:old] = self.levels, self.ring, self.ring_lv
        self.levels, self.ring, self.ring_lv = levels, ring, ring_lv
        self._free.extend(range(capacity - 1, old - 1, -1))
        self._capacity = capacity

    def _slot(self, stream: Hashable) -> int:
        slot = self._slots.get(stream)
        if slot is None:
            if not self._free:
                self._grow(2 * self._capacity)
            slot = self._slots[stream] = self._free.pop()
            for name in self._FIELDS:
                getattr(self, name)[slot] = 0
            self.floor[slot] = self.s.floor_start_db
            self.last_end[slot] = -(10**9)
        return slot

    def drop(self, stream: Hashable) -> None:
        slot = self._slots.pop(stream, None)
        if slot is not None:
            self._free.append(slot)

    def in_speech(self, stream: Hashable) -> bool:
        slot = self._slots.get(stream)
        return slot is not None and bool(self.speech[slot])

    def __contains__(self, stream: Hashable) -> bool:
        return stream in self._slots

    # ---- stepping ------------------------------------------------------------------------------------
    def push(self, frames: Mapping[Hashable, np.ndarray]) -> dict[Hashable, list[Segment]]:
        streams = [k for k, f in frames.items() if len(f)]
        if not streams:
            return {}
        if self._width == 0:
            self._width = frames[streams[0]].shape[1]
            self.ring = np.zeros((self._capacity, self._ring_size, self._width), np.float32)
        slots = np.array([self._slot(k) for k in streams])
        counts = np.array([len(frames[k]) for k in streams])
        x = np.zeros((len(streams), counts.max(), self._width), np.float32)
        for r, k in enumerate(streams):
            x[r, : counts[r]] = frames[k]
        first_frame = self.frame[slots].copy()
        member = np.zeros(x.shape[:2], bool)  # frames that belong to an utterance (stepped)
        events: list[tuple] = []  # (row, f, control, pre-roll frames or None, the utterance's first frame)
        calm = self._calm(slots, x, counts)
        for f in range(x.shape[1]):
            rows = np.nonzero((counts > f) & ~calm)[0]
            if len(rows):
                self._step(rows, slots[rows], x[rows, f], member, f, events)
        return self._segments(streams, slots, x, counts, first_frame, member, events)

    def _levels(self, x: np.ndarray) -> np.ndarray:
        """Frames' levels in dB (mean log-mel energy), clipped so that no inf enters the state."""
        return np.clip(x[..., 0].astype(np.float64) * self._scale, -300.0, 300.0)

    def _track_floor(self, slots: np.ndarray, level: np.ndarray) -> None:
        """The floor follows a silent stream's level down at once and up by ``floor_rise_db`` a frame."""
        s = self.s
        self.floor[slots] = np.maximum(np.minimum(level, self.floor[slots] + s.floor_rise_db), s.floor_min_db)

    def _calm(self, slots: np.ndarray, x: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Streams silent now whose frames of this tick cannot start an utterance (every level at most
        ``floor_min_db + start_db``, and the floor is never lower): their floors and pre-roll rings are
        advanced for the whole tick here, a few array operations a frame instead of a full step."""
        s = self.s
        levels = self._levels(x)
        valid = np.arange(x.shape[1])[None, :] < counts[:, None]
        peak = np.where(valid, levels, -np.inf).max(axis=1)
        calm = ~self.speech[slots] & (peak <= s.floor_min_db + s.start_db)
        rows = np.nonzero(calm)[0]
        if not len(rows):
            return calm
        for f in range(x.shape[1]):
            now = rows[counts[rows] > f]
            self._track_floor(slots[now], levels[now, f])
        keep = min(int(counts[rows].max()), self._ring_size)  # the ring keeps the last frames only
        for f in range(x.shape[1] - keep, x.shape[1]):
            now = rows[counts[rows] > f]
            sl = slots[now]
            pos = (self.frame[sl] + f) % self._ring_size
            self.ring[sl, pos], self.ring_lv[sl, pos] = x[now, f], levels[now, f]
        sl = slots[rows]
        self.frame[sl] += counts[rows]
        self.ring_n[sl] = np.minimum(self.ring_n[sl] + counts[rows], self._ring_size)
        self.loud[sl] = 0
        return calm

    def _step(self, rows, slots, x, member, f, events) -> None:
        """One frame of each of ``slots`` (its rows ``rows`` of the tick)."""
        s = self.s
        level = self._levels(x)
        self.frame[slots] += 1
        silent = ~self.speech[slots]
        everyone = bool(silent.all())  # the common case: no utterance in progress (no copies then)
        # silent streams: track the floor, fill the pre-roll ring, start on min_start loud frames
        r0, s0, l0, x0 = (
            (rows, slots, level, x) if everyone else (rows[silent], slots[silent], level[silent], x[silent])
        )
        if len(s0):
            loud = np.where(l0 > self.floor[s0] + s.start_db, self.loud[s0] + 1, 0)
            self.loud[s0] = loud
            pos = (self.frame[s0] - 1) % self._ring_size
            self.ring[s0, pos], self.ring_lv[s0, pos] = x0, l0
            self.ring_n[s0] = np.minimum(self.ring_n[s0] + 1, self._ring_size)
            starting = loud >= s.min_start
            self._track_floor(*((s0[~starting], l0[~starting]) if starting.any() else (s0, l0)))
            for r, slot in zip(r0[starting], s0[starting], strict=True):
                self._start(int(r), int(slot), f, events)
        if everyone:
            return
        # streams in an utterance: the frame belongs to it; end it after hangover, drop a new background
        r1, s1, l1 = rows[~silent], slots[~silent], level[~silent]
        if not len(s1):
            return
        member[r1, f] = True
        self.levels[s1, self.nlev[s1]] = l1
        self.nlev[s1] += 1
        self.heard[s1] += 1
        self.peak[s1] = np.maximum(self.peak[s1], l1)
        quiet = l1 < np.maximum(self.floor[s1] + s.stop_db, self.peak[s1] - s.stop_below_peak_db)
        self.quiet[s1] = np.where(quiet, self.quiet[s1] + 1, 0)
        self.voiced[s1] += ~quiet
        steady = self.heard[s1] - s.min_start == s.steady_frames  # the onset's first frames are skipped
        if steady.any():
            nlev = self.nlev[s1[steady]]
            window = self.levels[s1[steady][:, None], nlev[:, None] - np.arange(1, s.steady_frames + 1)]
            steady[steady] = window.max(axis=1) - window.min(axis=1) < s.steady_db
        background = steady | (self.nlev[s1] >= s.max_frames)
        for r, slot, was_steady in zip(r1[background], s1[background], steady[background], strict=True):
            kept = self.levels[
                slot, self.nlev[slot] - (s.steady_frames if was_steady else self.nlev[slot]) : self.nlev[slot]
            ]
            self.floor[slot] = max(float(np.median(kept)), s.floor_min_db)
            self._close(int(r), int(slot), "cancel", f, member, events)
        over = ~background & (self.quiet[s1] >= s.hangover)
        for r, slot in zip(r1[over], s1[over], strict=True):
            self._close(int(r), int(slot), self._verdict(int(slot)), f, member, events)

    def _start(self, row: int, slot: int, f: int, events: list) -> None:
        s = self.s
        n = int(self.ring_n[slot])
        order = (self.frame[slot] - n + np.arange(n)) % self._ring_size  # oldest first
        self.levels[slot, :n] = self.ring_lv[slot, order]
        self.speech[slot], self.quiet[slot], self.nlev[slot], self.ring_n[slot] = True, 0, n, 0
        self.peak[slot], self.voiced[slot], self.heard[slot] = (
            self.ring_lv[slot, order[-1]],
            s.min_start,
            s.min_start,
        )
        self.began[slot] = self.frame[slot] - n
        soon = self.frame[slot] - self.last_end[slot] <= s.follow_frames + s.min_start
        self.need[slot] = s.follow_min_frames if soon else s.min_frames
        events.append((row, f, "start", self.ring[slot, order].copy(), int(self.began[slot])))

    def _verdict(self, slot: int) -> SegmentControl:
        return "end" if self.voiced[slot] >= self.need[slot] else "cancel"

    def _close(self, row: int, slot: int, control: SegmentControl, f: int, member, events: list) -> None:
        self.speech[slot], self.loud[slot] = False, 0
        if control == "end":
            self.last_end[slot] = self.frame[slot]
        elif row >= 0:
            member[row, f] = False  # a cancelled utterance's frame is not stepped
        events.append((row, f, control, None, int(self.began[slot])))

    def _segments(
        self, streams, slots, x, counts, first_frame, member, events
    ) -> dict[Hashable, list[Segment]]:
        """The tick's segments per stream, from its events and the frames that belong to utterances."""
        by_row: dict[int, list] = {}
        for e in events:
            by_row.setdefault(e[0], []).append(e)
        out: dict[Hashable, list[Segment]] = {}
        in_progress = np.nonzero(member.any(axis=1))[0]
        for r in sorted(set(by_row).union(in_progress.tolist())):
            segs, pos, began = [], 0, int(self.began[slots[r]])
            start_of = int(first_frame[r])
            for _, f, control, preroll, began in by_row.get(r, ()):
                if control == "start":
                    segs.append(Segment("start", preroll, began, began))
                elif control == "end":
                    segs.append(Segment("end", x[r, pos : f + 1], start_of + pos, began))
                else:
                    segs.append(Segment("cancel", x[r, :0], start_of + f + 1, began))
                pos = f + 1
            if pos < counts[r] and self.speech[slots[r]]:  # the utterance goes on into the next tick
                segs.append(Segment(None, x[r, pos : counts[r]], start_of + pos, int(self.began[slots[r]])))
            out[streams[r]] = segs
        return out

    def flush(self, stream: Hashable, cut: bool = False) -> list[Segment]:
        """The stream ended: the utterance in progress ends here (or is cancelled: ``cut``, or too short)."""
        slot = self._slots.get(stream)
        if slot is None or not self.speech[slot]:
            return []
        control: SegmentControl = "cancel" if cut else self._verdict(slot)
        events: list = []
        self._close(-1, slot, control, 0, None, events)
        return [
            Segment(
                control, np.zeros((0, self._width), np.float32), int(self.frame[slot]), int(self.began[slot])
            )
        ]


class Endpointer:
    """One stream's endpointer: ``Endpointers`` with one slot."""

    def __init__(self, n_mels: int, s: EndpointSettings | None = None) -> None:
        self._bank = Endpointers(n_mels, s)

    @property
    def in_speech(self) -> bool:
        return self._bank.in_speech(0)

    def push(self, frames: np.ndarray) -> list[Segment]:
        return self._bank.push({0: frames}).get(0, [])

    def flush(self) -> list[Segment]:
        return self._bank.flush(0)

    def cancel(self) -> list[Segment]:
        return self._bank.flush(0, cut=True)


class Resampler:
    """One stream's samples from ``rate_in`` to ``rate_out`` Hz, as they arrive.

    The filter is ``scipy.signal.resample_poly``'s: with ``L/M = rate_out/rate_in`` in lowest terms, a
    Kaiser-windowed sinc (β = 5) of ``2·10·max(L, M) + 1`` taps, cut off at ``1/max(L, M)`` of the
    upsampled band, applied polyphase: output ``n`` sits at ``j = n·M`` of the upsampled signal, and

        y[n] = Σ_k h[(j mod L) + k·L] · x[j // L - k]        (x before the first sample: 0)

    It is causal, so ``y`` trails ``resample_poly``'s output (which shifts the filter's delay away) by
    ``delay`` = 10 output samples when downsampling (1.25 ms at 8 kHz): a sample is out as soon as the
    input it needs has arrived, whatever the chunking. ``resample`` runs many streams at once."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        if not (0 < rate_in <= 10**6 and 0 < rate_out <= 10**6):
            raise ValueError(f"rates must be in 1..1,000,000 Hz, got {rate_in} → {rate_out}")
        g = math.gcd(rate_in, rate_out)
        self.rates = (rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        widest = max(self.up, self.down)
        if widest == 1:  # the same rate: passed through
            h = np.ones(1)
        else:
            h = scipy.signal.firwin(2 * 10 * widest + 1, 1.0 / widest, window=("kaiser", 5.0)) * self.up
        self.taps = -(-len(h) // self.up)  # input samples each output reads
        h = np.concatenate([h, np.zeros(self.taps * self.up - len(h))])
        phases = h.reshape(self.taps, self.up).T  # (L, K): phase p's taps h[p + k·L]
        self.reversed = np.ascontiguousarray(phases[:, ::-1], np.float32)  # to meet x oldest first
        self.delay = 10 * widest // self.down if widest > 1 else 0  # output samples behind resample_poly
        self.history = np.zeros(self.taps - 1, np.float32)  # the last K-1 inputs
        self.inputs = 0  # samples received
        self.outputs = 0  # samples produced

    def push(self, x: np.ndarray) -> np.ndarray:
        """``x (n,) float32`` → the output samples it completes, ``(m,) float32``."""
        return resample([self], [np.asarray(x, np.float32).reshape(-1)])[0]


def resample(resamplers: list[Resampler], chunks: list[np.ndarray]) -> list[np.ndarray]:
    """Each resampler's output for its chunk. The output positions depend on the rates, the inputs so far
    modulo ``M`` and the chunk's length only: resamplers alike in those run as one array."""
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(resamplers)
    keys = [(r.rates, r.inputs % r.down, len(x)) for r, x in zip(resamplers, chunks, strict=True)]
    for (_, _, size), idx in _groups(keys).items():
        r0 = resamplers[idx[0]]
        end = -(-(r0.inputs + size) * r0.up // r0.down)  # outputs n < end have j // L <= the newest input
        n = np.arange(r0.outputs, end)
        history = np.stack([resamplers[i].history for i in idx])
        buf = np.concatenate([history, np.stack([chunks[i] for i in idx])], axis=1)  # (G, K-1+size)
        if len(n):
            j = n * r0.down
            first = j // r0.up - r0.inputs  # buf[:, first:first+K] holds x[i-K+1 .. i] for output n
            if r0.up == 1:  # decimation: evenly spaced windows (a strided view), one phase
                x = torch.from_numpy(buf[:, first[0] : first[-1] + r0.taps])
                y = (x.unfold(1, r0.taps, r0.down) @ torch.from_numpy(r0.reversed[0])).numpy()
            else:
                rows = np.lib.stride_tricks.sliding_window_view(buf, r0.taps, axis=1)  # oldest first
                y = np.einsum("gmk,mk->gm", rows[:, first], r0.reversed[j % r0.up]).astype(np.float32)
        tails = buf[:, buf.shape[1] - (r0.taps - 1) :]
        for g, i in enumerate(idx):
            r = resamplers[i]
            r.history = tails[g].copy()
            r.inputs, r.outputs = r.inputs + size, r.outputs + len(n)
            if len(n):
                out[i] = y[g]
    return out


class AudioFrontEnd:
    """Many audio streams in, utterance segments out; the one path for microphones and files alike.

    Per stream: samples at any rate → ``Resampler`` to ``settings.sample_rate`` (1.25 ms of delay) →
    frames → MFCC → endpointing. ``push`` queues samples; ``tick`` runs every stage once for all streams:
    resampling and framing as arrays of the streams alike, the MFCCs in one call (``MFCCBank``), the
    endpointers as one array per frame (``Endpointers``)."""

    def __init__(self, settings: MFCCSettings, endpoint: EndpointSettings | None = None) -> None:
        self.settings = settings
        self.endpoint = endpoint or EndpointSettings()
        self._bank = MFCCBank(settings)
        self._endpointers = Endpointers(settings.n_mels, self.endpoint)
        self._resamplers: dict[Hashable, Resampler] = {}
        self._raw: dict[Hashable, list[np.ndarray]] = {}  # samples waiting for their resampler
        self._streams: set[Hashable] = set()

    def push(self, stream: Hashable, samples: np.ndarray, rate: int | None = None) -> None:
        """``samples``: ``(n,) float32`` mono of ``stream`` at ``rate`` Hz (default: the features' rate)."""
        self._streams.add(stream)
        x = np.asarray(samples, np.float32).reshape(-1)
        if rate is None or rate == self.settings.sample_rate:
            self._bank.push(stream, x)
            return
        held = self._resamplers.get(stream)
        if held is None or held.rates[0] != rate:  # a new stream, or its rate changed (a device reopened)
            self._resample([stream])
            self._resamplers[stream] = Resampler(rate, self.settings.sample_rate)
        self._raw.setdefault(stream, []).append(x)

    def tick(self) -> list[tuple[Hashable, Segment]]:
        """The segments found in every stream's frames completed since the last tick, stream by stream."""
        self._resample(list(self._raw))
        found = self._endpointers.push(self._bank.tick())
        return [(stream, seg) for stream, segs in found.items() for seg in segs]

    def end(self, stream: Hashable, cut: bool = False) -> list[tuple[Hashable, Segment]]:
        """``stream`` is over: its resampler's tail is pushed, the utterance in progress ends (``cut``: the
        audio was cut off, so it is cancelled instead), the stream is forgotten. Returns ``tick()``'s
        segments (of every stream) and the closing one."""
        self._resample([stream])
        r = self._resamplers.pop(stream, None)
        if r is not None and not cut:  # the filter's tail: the last input's samples
            self._bank.push(stream, r.push(np.zeros(r.taps, np.float32))[: r.delay])
        out = self.tick()
        out.extend((stream, seg) for seg in self._endpointers.flush(stream, cut))
        self._endpointers.drop(stream)
        self._bank.drop(stream)
        self._streams.discard(stream)
        return out

    def close(self) -> None:
        """Forget every stream."""
        for stream in list(self._streams):
            self._endpointers.drop(stream)
        self._resamplers.clear()
        self._raw.clear()
        self._streams.clear()
        self._bank = MFCCBank(self.settings)

    def __contains__(self, stream: Hashable) -> bool:
        return stream in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def _resample(self, streams: list[Hashable]) -> None:
        """The queued samples of ``streams`` through their resamplers, into the MFCC bank."""
        todo = [k for k in streams if k in self._raw]
        if not todo:
            return
        chunks = [np.concatenate(q) if len(q) > 1 else q[0] for q in (self._raw.pop(k) for k in todo)]
        for k, y in zip(todo, resample([self._resamplers[k] for k in todo], chunks), strict=True):
            self._bank.push(k, y)


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


MAX_AMPLITUDE = 1000.0
"""Samples are floats around ±1 (full scale); far beyond it is not audio but a broken source."""


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
        """Every capture's counters summed (overflows, dropped samples, losses, reopens...; ``behind_ms``:
        the largest), and the blocks refused."""
        total: dict[str, int] = {"refused_blocks": self._refused, "streams_down": len(self._down)}
        for c in self.captures:
            for k, v in c.counters().items():
                # behind_ms is a level, not a count: the worst device's
                total[k] = max(total.get(k, 0), v) if k == "behind_ms" else total.get(k, 0) + v
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
            if len(x) and not (np.abs(x) <= MAX_AMPLITUDE).all():  # NaN fails the comparison too
                self._refused += 1
                bad = int((~(np.abs(x) <= MAX_AMPLITUDE)).sum())
                why = f"{bad} of {len(x)} samples NaN, infinite or beyond ±{MAX_AMPLITUDE:g}: block refused"
                messages.append(self._bad(c.name, why))
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

    @refusing
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
