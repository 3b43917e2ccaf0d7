"""Live recognition from a real audio device: PulseAudio's null sink (``audio_server`` fixture), digits
played into it with ``paplay`` and captured through sounddevice/PortAudio by ``rnnstream listen`` and
``rnnstream run configs/digits-mic.yaml``, as subprocesses; and a device that disappears."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FSDD = REPO.parent / "shared" / "data" / "fsdd" / "recordings"
RNNSTREAM = [sys.executable, "-m", "rnnstream.cli"]
HELD_OUT = ["3_theo_5.wav", "1_lucas_7.wav", "4_jackson_9.wav"]  # index 5-9: never trained on


def _wav(tmp_path: Path, names: list[str], rate: int = 8000) -> Path:
    """The recordings with 0.6 s of quiet between them, written at ``rate`` (paplay resamples to the sink)."""
    import librosa

    rng = np.random.default_rng(0)
    parts = []
    for name in names:
        audio, sr = soundfile.read(FSDD / name, dtype="float32")
        parts += [rng.normal(0, 3e-4, int(0.6 * sr)).astype(np.float32), audio]
    parts.append(rng.normal(0, 3e-4, int(0.6 * sr)).astype(np.float32))
    audio = np.concatenate(parts)
    if rate != sr:
        audio = librosa.resample(audio, orig_sr=sr, target_sr=rate)
    path = tmp_path / f"digits-{rate}.wav"
    soundfile.write(path, audio, rate)
    return path


class _Process:
    """A subprocess whose stdout lines and stderr are read without blocking."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out: list[str] = []
        self.err = ""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        self._sel.register(self.proc.stderr, selectors.EVENT_READ, "err")

    def pump(self, timeout: float) -> None:
        for key, _ in self._sel.select(timeout):
            line = key.fileobj.readline()
            if not line:
                self._sel.unregister(key.fileobj)
            elif key.data == "out":
                self.out.append(line)
            else:
                self.err += line

    def wait_for(self, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.err and time.monotonic() < deadline and self.proc.poll() is None:
            self.pump(0.1)
        assert what in self.err, f"no {what!r} within {timeout} s; stderr: {self.err[-2000:]}"

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out if line.startswith("{")]

    def finish(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream, attr in ((self.proc.stdout, "out"), (self.proc.stderr, "err")):
            rest = stream.read()
            if attr == "out":
                self.out += rest.splitlines(keepends=True)
            else:
                self.err += rest
        return self.proc.returncode


def _env(server) -> dict[str, str]:
    """The test's environment (the server's variables and run dir are in it: the fixture put them
    there), so ``listen`` with no ``--device`` finds the null sink by itself."""
    env = dict(os.environ)
    env.update(server.env)
    return env


@pytest.mark.parametrize("rate", [None, 48000], ids=["device-rate", "48kHz"])
def test_listen_recognises_digits_played_into_the_device(audio_server, tmp_path, rate):
    wav = _wav(tmp_path, HELD_OUT, rate=44100)
    args = [*RNNSTREAM, "listen", "--count", "3", "--timeout", "60"]
    if rate:
        args += ["--rate", str(rate)]
    p = _Process(args, _env(audio_server))
    p.wait_for("listening:", 60)
    time.sleep(1.0)  # the stream opens right after
    audio_server.play(wav)
    code = p.finish(30)
    assert code == 0, (p.out, p.err[-3000:])
    got = p.lines()
    assert [line["label"] for line in got] == ["3", "1", "4"], (got, p.err[-2000:])
    assert all(line["stream"] == "mic" and 0 < line["confidence"] <= 1 for line in got)
    assert "0 overflows, 0 dropped samples, 0 device losses" in p.err


def test_a_device_that_disappears_is_reported_and_listening_resumes_when_it_returns(audio_server, tmp_path):
    wav = _wav(tmp_path, ["7_nicolas_6.wav"])
    p = _Process([*RNNSTREAM, "listen", "--count", "1", "--timeout", "90"], _env(audio_server))
    p.wait_for("listening:", 60)
    time.sleep(1.0)
    try:
        audio_server.kill()
        p.wait_for("device lost", 10)
        time.sleep(1.5)  # it retries, fails, and goes on running
        assert p.proc.poll() is None, p.err[-2000:]
    finally:
        audio_server.restart()
    p.wait_for("back", 15)
    time.sleep(1.0)
    audio_server.play(wav)
    code = p.finish(30)
    assert code == 0, (p.out, p.err[-3000:])
    assert [line["label"] for line in p.lines()] == ["7"], p.err[-2000:]
    assert "1 device losses" in p.err


def test_run_digits_mic_config_prints_recognitions(audio_server, tmp_path):
    wav = _wav(tmp_path, HELD_OUT[:2])
    p = _Process([*RNNSTREAM, "run", "configs/digits-mic.yaml"], _env(audio_server))
    p.wait_for("capturing from", 60)
    time.sleep(0.5)
    audio_server.play(wav)
    deadline = time.monotonic() + 10
    while len(p.lines()) < 2 and time.monotonic() < deadline:
        p.pump(0.1)
    p.proc.send_signal(signal.SIGTERM)
    code = p.finish(20)
    assert code == 0, (p.out, p.err[-3000:])
    assert [line["label"] for line in p.lines()] == ["3", "1"], p.err[-2000:]
