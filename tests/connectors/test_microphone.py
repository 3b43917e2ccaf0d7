"""Microphones (``connectors.microphone``): the ring buffer between PortAudio's thread and ``read`` (unit,
driven through the callback), and a real device: PulseAudio's null sink captured through sounddevice,
which disappears and comes back."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile

from connectors.audio import DeviceLost
from connectors.microphone import Microphone

OK = SimpleNamespace(input_overflow=False)
OVERFLOW = SimpleNamespace(input_overflow=True)


def _ready(rate: int = 1000, buffer_s: float = 0.1) -> Microphone:
    """A microphone whose stream is faked as open (the callback is PortAudio's side)."""
    mic = Microphone(rate=rate, buffer_s=buffer_s)
    mic._ring = np.zeros(int(rate * buffer_s), np.float32)
    mic._stream = SimpleNamespace(abort=lambda: None, close=lambda: None)
    mic._last_block = mic._opened_at = time.monotonic()
    return mic


def test_blocks_come_out_in_order_across_the_ring_s_end():
    mic = _ready()  # a ring of 100 samples
    got = []
    for k in range(30):
        block = np.arange(k * 7, k * 7 + 7, dtype=np.float32)[:, None]
        mic._callback(block, 7, None, OK)
        if k % 3 == 2:
            got.append(mic.read())
    assert np.array_equal(np.concatenate(got), np.arange(210, dtype=np.float32))
    assert mic.counters()["dropped_samples"] == 0


def test_a_full_ring_drops_and_counts_and_an_overflow_flag_is_counted():
    mic = _ready()
    for _ in range(3):
        mic._callback(np.ones((40, 1), np.float32), 40, None, OK)  # 120 samples into a ring of 100
    mic._callback(np.ones((10, 1), np.float32), 10, None, OVERFLOW)
    assert len(mic.read()) == 100
    c = mic.counters()
    assert c["dropped_samples"] == 30 and c["overflows"] == 1


def test_stereo_is_mixed_down():
    mic = _ready()
    mic._callback(np.array([[1.0, 0.0], [0.5, 0.5]], np.float32), 2, None, OK)
    assert np.array_equal(mic.read(), np.array([0.5, 0.5], np.float32))


def test_a_stream_that_stops_or_stalls_is_a_lost_device():
    mic = _ready()
    mic._callback(np.ones((5, 1), np.float32), 5, None, OK)
    mic._finished()
    assert len(mic.read()) == 5  # what arrived before is still handed out
    with pytest.raises(DeviceLost, match="the stream stopped"):
        mic.read()
    stalled = _ready()
    stalled.stall_s = 0.05
    time.sleep(0.1)
    with pytest.raises(DeviceLost, match="no audio for"):
        stalled.read()
    assert stalled.counters()["lost"] == 1 and not stalled.is_open


# ---- a real device -----------------------------------------------------------------------------------
@pytest.mark.integration
def test_the_null_sink_is_captured_at_48_khz_and_survives_the_server_dying(audio_server, tmp_path):
    rate = 48000
    t = np.arange(int(0.5 * rate)) / rate
    soundfile.write(tmp_path / "tone.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    mic = Microphone(audio_server.device, rate)
    mic.open()
    try:
        time.sleep(0.3)
        mic.read()
        audio_server.play(tmp_path / "tone.wav")
        time.sleep(0.3)
        got = mic.read()
        assert mic.rate == rate and np.abs(got).max() > 0.3  # the tone arrived
        c = mic.counters()
        assert c["overflows"] == 0 and c["dropped_samples"] == 0 and c["behind_ms"] < 500
        audio_server.kill()
        deadline = time.monotonic() + 5
        with pytest.raises(DeviceLost):
            while time.monotonic() < deadline:
                mic.read()
                time.sleep(0.02)
        with pytest.raises(DeviceLost, match="cannot open"):
            mic.open()
    finally:
        audio_server.restart()
    mic.open()  # the same process opens it again once it is back
    done = threading.Event()
    threading.Timer(0.3, done.set).start()
    done.wait()
    assert len(mic.read()) > 0.1 * rate
    c = mic.counters()
    assert c["lost"] == 1 and c["reopens"] == 1 and c["open_errors"] == 1
    mic.close()
