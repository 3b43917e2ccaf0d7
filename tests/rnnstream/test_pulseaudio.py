"""Integration tests for rnnstream.pulseaudio: a real PulseAudio null sink, captured with sounddevice.

Needs ``pulseaudio pulseaudio-utils libportaudio2 libasound2-plugins`` (``scripts/system_deps.sh``).
sounddevice is imported inside the tests only, after the ``audio_server`` fixture has put the server's
environment into ``os.environ`` (PortAudio lists the ALSA ``pulse`` device only if it reaches a server
when sounddevice is first imported).  Servers of a test's own live in a private run dir and are
pointed at through ``PULSE_SERVER`` for the streams opened while that test runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rnnstream import pulseaudio as pa

RATE = 48000


def _tone(path: Path, seconds: float = 0.5, freq: float = 440.0) -> np.ndarray:
    """Write a 440 Hz tone (10 ms fades) as 16-bit WAV at 48 kHz; return the samples as written."""
    t = np.arange(int(seconds * RATE)) / RATE
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)
    x = (0.5 * fade * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    sf.write(path, x, RATE, subtype="PCM_16")
    return sf.read(path, dtype="float32")[0]


def _max_ncc(captured: np.ndarray, ref: np.ndarray) -> float:
    """Largest normalised cross-correlation of ``ref`` with any window of ``captured`` (1 = same shape)."""
    n = len(ref)
    size = 1 << (len(captured) + n).bit_length()
    spec = np.fft.rfft(captured, size) * np.conj(np.fft.rfft(ref, size))
    corr = np.fft.irfft(spec, size)[: len(captured) - n + 1]
    energy = np.convolve(captured.astype(np.float64) ** 2, np.ones(n), "valid")
    return float(np.max(corr / np.sqrt(np.maximum(energy, 1e-12) * np.sum(ref.astype(np.float64) ** 2))))


class Recorder:
    """An ``InputStream`` callback that keeps (arrival time, mono block, status) per call."""

    def __init__(self) -> None:
        self.blocks: list[tuple[float, np.ndarray, str]] = []
        self.finished = threading.Event()

    def __call__(self, indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        self.blocks.append((time.monotonic(), indata[:, 0].copy(), str(status)))

    def audio(self) -> np.ndarray:
        return np.concatenate([b for _, b, _ in self.blocks]) if self.blocks else np.zeros(0, np.float32)

    def first_loud(self, after: float, level: float = 0.05) -> float | None:
        """Arrival time of the first block after ``after`` with a sample louder than ``level``."""
        return next((t for t, b, _ in self.blocks if t > after and np.abs(b).max() > level), None)


def _open(server: pa.AudioServer, rec: Recorder):
    import sounddevice as sd

    # 480-frame blocks with a 20 ms latency: one callback every 10 ms
    return sd.InputStream(
        device=server.device,
        samplerate=RATE,
        channels=1,
        blocksize=480,
        latency=0.02,
        callback=rec,
        finished_callback=rec.finished.set,
    )


@pytest.fixture
def private_server(audio_server, tmp_path, monkeypatch):
    """A 48 kHz server of the test's own (own run dir), which streams opened in this test talk to."""
    monkeypatch.setenv(pa.RUN_DIR_ENV, str(tmp_path / "audio"))
    server = pa.up(RATE)
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    yield server
    pa.down()


def test_missing_binary_names_the_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(pa.RUN_DIR_ENV, str(tmp_path / "audio"))
    with pytest.raises(pa.AudioServerError, match="pulseaudio-utils"):
        pa.up()
    assert pa.status() is None


@pytest.mark.integration
def test_up_is_idempotent_and_pactl_sees_the_null_sink(audio_server):
    assert pa.up(RATE) == audio_server
    assert pa.status() == audio_server
    assert pa.client_env() == audio_server.env
    assert os.environ["PULSE_SERVER"] == audio_server.env["PULSE_SERVER"]
    sinks = audio_server.pactl("list", "short", "sinks").stdout.splitlines()
    assert any(f"\t{audio_server.sink}\t" in line and f"{RATE}Hz" in line for line in sinks), sinks
    info = audio_server.pactl("info").stdout
    assert f"Default Source: {audio_server.source}" in info
    with pytest.raises(pa.AudioServerError, match="already running at 48000 Hz"):
        pa.up(16000)


@pytest.mark.integration
def test_sounddevice_lists_the_pulse_device(audio_server):
    import sounddevice as sd

    assert audio_server.device in [d["name"] for d in sd.query_devices()]


@pytest.mark.integration
def test_a_played_tone_is_captured(audio_server, tmp_path):
    tone = _tone(tmp_path / "tone.wav")
    rec = Recorder()
    with _open(audio_server, rec):
        opened = time.monotonic()
        time.sleep(0.2)
        played = time.monotonic()
        audio_server.play(tmp_path / "tone.wav")
        time.sleep(0.3)
    assert rec.blocks and rec.blocks[0][0] - opened < 0.5  # no 2 s null-sink block
    assert {s for _, _, s in rec.blocks} == {""}
    assert _max_ncc(rec.audio(), tone) > 0.95
    heard = rec.first_loud(played)
    assert heard is not None and heard - played < 0.3  # measured ~17 ms


@pytest.mark.integration
def test_up_outlives_the_caller_and_down_stops_it(audio_server, tmp_path, monkeypatch):
    monkeypatch.setenv(pa.RUN_DIR_ENV, str(tmp_path / "audio"))
    code = "from rnnstream import pulseaudio as pa; print(pa.up(16000).pid)"
    pid = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    try:
        server = pa.status()
        assert server is not None and server.pid == pid and server.rate == 16000
        assert "16000Hz" in server.pactl("list", "short", "sinks").stdout
        assert pa.client_env() == server.env
    finally:
        assert pa.down()
    assert pa.status() is None
    assert pa.client_env() == {}
    assert not pa.down()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1]


@pytest.mark.integration
def test_killed_server_ends_the_stream_and_restart_brings_it_back(private_server, tmp_path):
    """What a microphone source sees when the audio server dies (SIGKILL) mid-capture."""
    import sounddevice as sd

    tone = _tone(tmp_path / "tone.wav")
    rec = Recorder()
    stream = _open(private_server, rec)
    stream.start()
    time.sleep(0.3)
    assert stream.active and rec.blocks
    private_server.kill()
    killed = time.monotonic()
    assert not private_server.alive and pa.status() is None
    # the callback is not called again, with no status flag; PortAudio ends the stream by itself
    assert rec.finished.wait(2.0)
    assert not stream.active
    assert all(t < killed for t, _, _ in rec.blocks)
    assert {s for _, _, s in rec.blocks} == {""}
    stream.stop()  # returns at once, as do close() and abort()
    stream.close()
    with pytest.raises(sd.PortAudioError):  # nothing to connect to
        _open(private_server, Recorder()).close()

    private_server.restart()
    assert private_server.alive and pa.status() == private_server
    rec = Recorder()  # a new stream, no sd._terminate()/_initialize() needed
    with _open(private_server, rec):
        time.sleep(0.1)
        private_server.play(tmp_path / "tone.wav")
        time.sleep(0.2)
    assert _max_ncc(rec.audio(), tone) > 0.95
