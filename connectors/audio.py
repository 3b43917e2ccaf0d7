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

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import librosa
import numpy as np
import scipy.fft

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
