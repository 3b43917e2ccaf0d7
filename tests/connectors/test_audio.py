"""Streaming MFCC (``connectors.audio``) against librosa over the whole signal, for any chunking."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from connectors.audio import MFCCBank, MFCCSettings, StreamingMFCC


def _signal(sr: int, seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    tone = 0.5 * np.sin(2 * np.pi * 440 * t) * (t > 0.1) + 0.2 * np.sin(2 * np.pi * 1234.5 * t)
    return (tone + rng.normal(0, 0.05, len(t)) + 1e-6).astype(np.float32)


def _librosa(y: np.ndarray, s: MFCCSettings) -> np.ndarray:
    """The reference, ``(frames, n_mfcc)``."""
    mel = librosa.feature.melspectrogram(
        y=y,
        sr=s.sample_rate,
        n_fft=s.n_fft,
        hop_length=s.hop_length,
        center=False,
        n_mels=s.n_mels,
        fmin=s.fmin,
        fmax=s.fmax,
    )
    return librosa.feature.mfcc(S=librosa.power_to_db(mel, top_db=None), n_mfcc=s.n_mfcc).T


def _streamed(y: np.ndarray, mfcc: StreamingMFCC, chunks: list[int]) -> np.ndarray:
    out, i, k = [], 0, 0
    while i < len(y):
        n = chunks[k % len(chunks)]
        out.append(mfcc.push(y[i : i + n]))
        i, k = i + n, k + 1
    return np.concatenate(out)


CASES = [
    (8000, 256, 80, 40, 13),
    (8000, 200, 80, 32, 20),  # n_fft not a power of two
    (16000, 512, 160, 40, 13),
    (16000, 400, 256, 64, 20),
    (44100, 2048, 441, 128, 20),
    (44100, 1024, 1024, 40, 13),  # hop = n_fft
]


@pytest.mark.parametrize(("sr", "n_fft", "hop", "n_mels", "n_mfcc"), CASES)
@pytest.mark.parametrize("chunk", ["1", "hop-1", "odd", "hop", "1s"])
def test_streamed_mfcc_equals_librosa_for_any_chunking(sr, n_fft, hop, n_mels, n_mfcc, chunk):
    y = _signal(sr, 0.25 if chunk == "1" else 0.6)
    mfcc = StreamingMFCC(sr, n_mfcc=n_mfcc, n_fft=n_fft, hop_length=hop, n_mels=n_mels)
    chunks = {"1": [1], "hop-1": [hop - 1], "odd": [1, 7, 333, 0, 2, hop + 3], "hop": [hop], "1s": [sr]}[
        chunk
    ]
    got = _streamed(y, mfcc, chunks)
    want = _librosa(y, mfcc.settings)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_fmin_fmax_and_a_short_signal():
    s = dict(n_mfcc=13, n_fft=512, hop_length=128, n_mels=40, fmin=100.0, fmax=3800.0)
    y = _signal(8000, 0.3)
    mfcc = StreamingMFCC(8000, **s)
    assert mfcc.push(y[:511]).shape == (0, 13)  # one sample short of the first frame
    first = mfcc.push(y[511:512])
    assert first.shape == (1, 13)  # out as soon as its last sample is in
    rest = mfcc.push(y[512:])
    want = _librosa(y, mfcc.settings)
    got = np.concatenate([first, rest])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_bank_of_streams_equals_each_stream_alone():
    settings = MFCCSettings(16000, n_mfcc=13, n_fft=400, hop_length=160, n_mels=40)
    rng = np.random.default_rng(1)
    signals = {f"mic{k}": _signal(16000, 0.4, seed=k) for k in range(5)}
    bank, alone = MFCCBank(settings), {k: StreamingMFCC(16000, 13, 400, 160, 40) for k in signals}
    got = {k: [] for k in signals}
    want = {k: [] for k in signals}
    pos = dict.fromkeys(signals, 0)
    while any(pos[k] < len(y) for k, y in signals.items()):
        for k, y in signals.items():
            n = int(rng.integers(0, 900))
            part = y[pos[k] : pos[k] + n]
            pos[k] += n
            bank.push(k, part)
            want[k].append(alone[k].push(part))
        if rng.random() < 0.5:
            for k, f in bank.tick().items():
                got[k].append(f)
    for k, f in bank.tick().items():
        got[k].append(f)
    for k in signals:  # the same math, batched: equal up to float32 rounding
        a, b = np.concatenate(got[k]), np.concatenate(want[k])
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert len(bank) == 5


def test_settings_are_checked():
    with pytest.raises(ValueError):
        MFCCSettings(16000, n_mfcc=50, n_mels=40)
    with pytest.raises(ValueError):
        MFCCSettings(0)


@pytest.mark.parametrize("rate_in", [16000, 44100, 48000, 22050])
@pytest.mark.parametrize("chunk", [1, 7, 480, 4410, 100_000])
def test_the_streaming_resampler_equals_resample_poly_behind_its_delay(rate_in, chunk):
    """``Resampler`` over any chunking equals ``scipy.signal.resample_poly`` (the same filter) on the whole
    signal, ``delay`` samples later: causal, so a sample is out as soon as its inputs are."""
    import scipy.signal

    from connectors.audio import Resampler

    x = _signal(rate_in, seconds=0.3)
    r = Resampler(rate_in, 8000)
    got = np.concatenate([r.push(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    g = np.gcd(rate_in, 8000)
    want = scipy.signal.resample_poly(x.astype(np.float64), 8000 // g, rate_in // g)
    assert r.delay == 10
    n = min(len(got) - r.delay, len(want))
    assert n > 0.29 * 8000
    assert np.abs(got[r.delay : r.delay + n] - want[:n]).max() < 1e-5 * np.abs(want).max() + 1e-6
