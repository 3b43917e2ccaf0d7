"""Audio files as streams (``connectors.audio_files``): reading, pacing, and hostile files (fuzzed from
valid WAV and FLAC files: header fields, cuts and byte noise)."""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.audio import AudioUnusable, Resampler
from connectors.audio_files import AudioFile, load


def _tone(rate: int = 8000, seconds: float = 0.3, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def _encoded(fmt: str, subtype: str, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, _tone(channels=channels), 8000, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_load_mixes_down_and_notes_it(tmp_path):
    soundfile.write(tmp_path / "st.flac", _tone(channels=2), 8000)
    audio, rate, notes = load(tmp_path / "st.flac")
    assert rate == 8000 and audio.ndim == 1 and len(audio) == 2400
    assert notes == ["2 channels mixed down to mono"]


@pytest.mark.parametrize("speed", [None, 4.0])
def test_a_file_is_read_in_chunks_or_at_pace(tmp_path, speed):
    soundfile.write(tmp_path / "t.wav", _tone(seconds=1.0), 8000)
    f = AudioFile(tmp_path / "t.wav", speed=speed)
    f.open()
    got, started = [], time.monotonic()
    while not f.finished:
        got.append(f.read())
        time.sleep(0.01)
    assert sum(map(len, got)) == 8000
    if speed is None:
        assert max(map(len, got)) == 800  # 100 ms chunks
    else:
        assert time.monotonic() - started >= 1.0 / speed * 0.9  # no faster than its pace


_VALID = [
    _encoded("WAV", "PCM_16"),
    _encoded("WAV", "FLOAT", channels=2),
    _encoded("FLAC", "PCM_16"),
]


@st.composite
def _hostile(draw: st.DrawFn) -> bytes:
    """A valid file, then header fields rewritten, cut short, or bytes overwritten with noise."""
    data = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "cut", "noise", "splice"]))
        if kind == "field" and len(data) >= 44:  # the WAV header's 16/32-bit fields (rates, sizes, format)
            at = draw(st.sampled_from([4, 16, 20, 22, 24, 28, 32, 34, 40]))
            value = draw(st.sampled_from([0, 1, 2, 3, 0xFFFF, 0xFFFFFFFF, 48000, 7]))
            width = 2 if at in (20, 22, 32, 34) else 4
            data[at : at + width] = struct.pack("<I", value)[:width]
        elif kind == "cut":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "noise" and data:
            at = draw(st.integers(0, len(data) - 1))
            noise = draw(st.binary(min_size=1, max_size=64))
            data[at : at + len(noise)] = noise
        else:
            data[draw(st.integers(0, len(data))) : draw(st.integers(0, len(data)))] = draw(st.binary())
    return bytes(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=_hostile())
def test_a_hostile_file_is_read_or_refused_with_a_reason(tmp_path, data):
    path = tmp_path / "hostile.wav"
    path.write_bytes(data)
    try:
        audio, rate, _notes = load(path)
    except AudioUnusable as exc:
        assert str(exc)
        return
    assert 1000 <= rate <= 384_000 and audio.dtype == np.float32 and audio.ndim == 1 and len(audio) > 0
    assert np.isfinite(audio).all()
    AudioFile(path).open()  # what the audio source does with it
    Resampler(rate, 8000).push(audio[:4000])  # a rate it can resample
