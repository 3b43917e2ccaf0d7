"""The audio path before the engine (``connectors.audio``): streaming endpointer segments, the front end
(resampling, batching), ``AudioSource`` over captures and ``AudioDecoder`` under hostile payloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from connectors.audio import (
    AudioDecoder,
    AudioFrontEnd,
    AudioSource,
    BadAudio,
    DeviceLost,
    Endpointer,
    MFCCSettings,
    Segment,
    mfcc_of,
)
from connectors.audio_files import AudioFile
from connectors.base import Message
from connectors.codec import Decoded, DecodeError

FSDD = Path(__file__).resolve().parents[3] / "shared" / "data" / "fsdd" / "recordings"
SR = 8000
FEATURES = MFCCSettings(SR, n_mfcc=20, n_fft=256, hop_length=80, n_mels=40, fmin=20.0, fmax=4000.0)


def _clip(name: str) -> np.ndarray:
    audio, sr = soundfile.read(FSDD / name, dtype="float32")
    assert sr == SR
    return audio


def _quiet(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1e-4, int(seconds * SR)).astype(np.float32)


def _speech() -> np.ndarray:
    """Two digits with quiet around them."""
    parts = [_quiet(0.3), _clip("2_george_5.wav"), _quiet(0.5, 1), _clip("9_theo_8.wav"), _quiet(0.5, 2)]
    return np.concatenate(parts)


def _utterances(segments: list[Segment]) -> list[tuple[int, int, np.ndarray]]:
    """``(began, end, frames)`` of every utterance that ended, from a stream's segments in order."""
    done, frames, began = [], [], None
    for seg in segments:
        if seg.control == "start":
            frames, began = [], seg.first
        if len(seg.frames):
            assert began is not None, "frames outside an utterance"
            assert seg.first == began + sum(len(f) for f in frames), "a gap or an overlap"
            frames.append(seg.frames)
        if seg.control == "end":
            done.append((began, seg.last, np.concatenate(frames)))
            began = None
        if seg.control == "cancel":
            began = None
    return done


@pytest.mark.parametrize("chunk_frames", [1, 3, 10, 1000])
def test_the_endpointer_hands_out_each_utterance_once_whatever_the_chunking(chunk_frames):
    """The segments of an utterance are contiguous frames of the stream, from ``start`` to ``end``; they
    do not depend on how the frames were pushed."""
    feats = mfcc_of(_speech(), FEATURES)
    whole = _utterances(Endpointer(FEATURES.n_mels).push(feats))
    assert len(whole) == 2
    ep = Endpointer(FEATURES.n_mels)
    segments = []
    for i in range(0, len(feats), chunk_frames):
        segments += ep.push(feats[i : i + chunk_frames])
    got = _utterances(segments)
    assert [(b, e) for b, e, _ in got] == [(b, e) for b, e, _ in whole]
    for (b, e, f), (_, _, g) in zip(got, whole, strict=True):
        assert np.array_equal(f, g) and np.array_equal(f, feats[b:e])


def test_a_click_is_cancelled_after_it_started():
    audio = _quiet(1.0)
    audio[4000:4040] += 0.8 * np.exp(-np.arange(40) / 8)
    audio[4100:4140] += 0.8 * np.exp(-np.arange(40) / 8)
    segments = Endpointer(FEATURES.n_mels).push(mfcc_of(audio, FEATURES))
    controls = [s.control for s in segments if s.control]
    assert controls in ([], ["start", "cancel"]), controls
    assert "end" not in controls


def test_a_stream_ended_mid_utterance_is_ended_or_cut():
    clip = _clip("5_lucas_6.wav")
    audio = np.concatenate([_quiet(0.3), clip[: len(clip) * 2 // 3]])  # cut off while speaking
    for cut, last in ((False, "end"), (True, "cancel")):
        front = AudioFrontEnd(FEATURES)
        front.push("s", audio)
        segs = front.tick() + front.end("s", cut=cut)
        assert [s.control for _, s in segs if s.control][-1] == last
        assert "s" not in front


def test_the_front_end_resamples_a_48_khz_stream_to_the_same_utterances():
    """The same audio at 8 kHz and at 48 kHz (resampled by soxr in the front end) gives the same
    utterance boundaries within a frame or two."""
    import librosa

    audio = _speech()
    front = AudioFrontEnd(FEATURES)
    front.push("8k", audio)
    hi = librosa.resample(audio, orig_sr=SR, target_sr=48000)
    for i in range(0, len(hi), 480):  # 10 ms blocks, as a device delivers them
        front.push("48k", hi[i : i + 480], 48000)
    segs = front.tick() + front.end("8k") + front.end("48k")
    by = {k: _utterances([s for name, s in segs if name == k]) for k in ("8k", "48k")}
    assert len(by["8k"]) == len(by["48k"]) == 2
    for (b1, e1, _), (b2, e2, _) in zip(by["8k"], by["48k"], strict=True):
        assert abs(b1 - b2) <= 2 and abs(e1 - e2) <= 2


class _FakeMic:
    """A capture whose device can be made to disappear (pure logic; the real device is tested in
    test_microphone.py)."""

    def __init__(self, name: str, audio: np.ndarray) -> None:
        self.name, self.rate, self.audio, self.pos = name, SR, audio, 0
        self.present, self.opened = True, 0

    def open(self) -> None:
        if not self.present:
            raise DeviceLost(f"{self.name}: cannot open: no such device")
        self.opened += 1

    def read(self) -> np.ndarray:
        if not self.present:
            raise DeviceLost(f"{self.name}: device lost")
        out = self.audio[self.pos : self.pos + 800]
        self.pos += len(out)
        return out

    @property
    def finished(self) -> bool:
        return False

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


class _Assign:
    def assigned(self, partitions: list[int]) -> None:
        self.partitions = partitions

    def revoked(self, partitions: list[int]) -> None:
        pass


def test_a_device_that_disappears_is_reported_and_reopened_while_the_others_go_on():
    speech = np.tile(_speech(), 3)
    a, b = _FakeMic("a", speech), _FakeMic("b", speech)
    source = AudioSource([a, b], FEATURES, reopen_s=0.05)
    source.open(_Assign(), {})
    msgs = []
    for _ in range(20):
        msgs += source.poll(0.0)
    a.present = False
    for _ in range(20):
        msgs += source.poll(0.0)
    lost = [m for m in msgs if isinstance(m.payload, BadAudio)]
    assert [m.key for m in lost] == ["a"] and "device lost" in lost[0].payload.reason
    assert source.counters()["streams_down"] == 1
    b_before = sum(1 for m in msgs if m.key == "b" and m.payload.control == "end")
    for _ in range(40):
        msgs += source.poll(0.0)
    assert sum(1 for m in msgs if m.key == "b" and m.payload.control == "end") > b_before  # b went on
    a.present = True
    import time

    time.sleep(0.06)
    source.poll(0.0)
    assert a.opened == 2 and source.counters()["streams_down"] == 0


def test_files_are_streams_and_a_bad_file_is_a_dead_letter(tmp_path):
    soundfile.write(tmp_path / "good.wav", _speech(), SR)
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt nonsense")
    nan = _speech()
    nan[5000:5003] = np.nan
    soundfile.write(tmp_path / "nan.wav", nan, SR, subtype="FLOAT")
    files = [AudioFile(tmp_path / n, name=n) for n in ("good.wav", "bad.wav", "nan.wav")]
    source = AudioSource(list(files), FEATURES)
    source.open(_Assign(), {})
    msgs = []
    while not source.exhausted:
        msgs += source.poll(0.01)
    bad = {m.key: m.payload.reason for m in msgs if isinstance(m.payload, BadAudio)}
    assert set(bad) == {"bad.wav", "nan.wav"}
    assert "cannot read audio" in bad["bad.wav"] and "3 samples are NaN" in bad["nan.wav"]
    ends = [m for m in msgs if m.key == "good.wav" and m.payload.control == "end"]
    assert len(ends) == 2


class _SeqCapture(_FakeMic):
    def __init__(self, blocks: list[np.ndarray]) -> None:
        super().__init__("seq", np.zeros(0, np.float32))
        self.blocks = blocks

    def read(self) -> np.ndarray:
        return self.blocks.pop(0) if self.blocks else np.zeros(0, np.float32)


def test_a_block_with_nan_or_inf_is_refused_whole_and_the_stream_goes_on():
    good = _speech()
    blocks = [good[i : i + 800] for i in range(0, len(good), 800)]
    blocks.insert(3, np.array([0.1, np.inf, np.nan], np.float32))
    blocks.insert(9, np.full(800, 1e30, np.float32))  # would poison the stream's noise floor
    source = AudioSource([_SeqCapture(blocks)], FEATURES)
    source.open(_Assign(), {})
    msgs = []
    for _ in range(len(blocks) + 2):
        msgs += source.poll(0.0)
    bad = [m.payload.reason for m in msgs if isinstance(m.payload, BadAudio)]
    assert bad == [
        "2 of 3 samples NaN, infinite or beyond ±1000: block refused",
        "800 of 800 samples NaN, infinite or beyond ±1000: block refused",
    ]
    assert sum(1 for m in msgs if isinstance(m.payload, Segment) and m.payload.control == "end") == 2


# ---- the decoder under hostile payloads --------------------------------------------------------------
_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int16, np.complex64, np.bool_, object]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=25),
    elements=None,
)
_controls = st.sampled_from(["start", None, "end", "cancel", "bogus", 7])
_segments = st.builds(
    Segment, _controls, st.one_of(_arrays, st.lists(st.floats()), st.none(), st.text()), st.integers()
)
_payloads = st.one_of(
    _segments,
    st.builds(BadAudio, st.text()),
    st.binary(),
    st.none(),
    st.dictionaries(st.text(), st.integers()),
    _arrays,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(payload=_payloads, key=st.one_of(st.text(), st.binary(), st.none()))
def test_the_decoder_lets_no_exception_but_decode_error_escape(payload, key):
    """Whatever a message holds, decoding gives a usable event (finite ``(T, n_mfcc)`` float32 frames
    and a known control) or a ``DecodeError`` with a reason."""
    decoder = AudioDecoder(FEATURES.n_mfcc)
    try:
        got = decoder.decode(Message(payload, key))
    except DecodeError as exc:
        assert str(exc)
        return
    assert isinstance(got, Decoded)
    assert got.control in (None, "start", "end", "reset")
    xs = np.asarray(got.xs, np.float32)
    assert len(xs) == 0 or (xs.shape[1:] == (FEATURES.n_mfcc,) and np.isfinite(xs).all())


@pytest.mark.parametrize(("noise", "clip"), [(3e-4, "3_theo_5.wav"), (1e-3, "0_george_5.wav")])
def test_noise_that_starts_after_digital_silence_does_not_hide_the_speech_after_it(noise, clip):
    """A device that opens on digital silence, then its own noise, then a digit 0.6 s later."""
    rng = np.random.default_rng(3)
    speech = _clip(clip)
    audio = np.concatenate(
        [
            np.zeros(SR // 2, np.float32),
            rng.normal(0, noise, int(0.6 * SR)).astype(np.float32),
            speech + rng.normal(0, noise, len(speech)).astype(np.float32),
            rng.normal(0, noise, SR // 2).astype(np.float32),
        ]
    )
    front = AudioFrontEnd(FEATURES)
    front.push("s", audio)
    got = _utterances([seg for _, seg in front.tick() + front.end("s")])
    assert len(got) == 1, got
    began_s = got[0][0] * FEATURES.hop_length / SR
    assert 0.95 <= began_s <= 1.3, began_s  # the digit's file starts at 1.1 s
