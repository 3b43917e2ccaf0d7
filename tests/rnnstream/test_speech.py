"""Recognising digits in audio (``rnnstream.speech``, ``rnnstream transcribe``): utterances split by the
endpointer, the label's delay after speech ends, noise that must not make utterances, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from typer.testing import CliRunner

from models import load_bundle
from rnnstream.cli import app
from rnnstream.digits import ASSET
from rnnstream.speech import Recognizer

FSDD = Path(__file__).resolve().parents[3] / "shared" / "data" / "fsdd" / "recordings"
SR = 8000


def _clip(name: str) -> np.ndarray:
    audio, sr = soundfile.read(FSDD / name, dtype="float32")
    assert sr == SR
    return audio


def _silence(seconds: float, level: float = 1e-4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, level, int(seconds * SR)).astype(np.float32)


def _transcribe(*paths: Path) -> tuple[int, list[dict], str]:
    result = CliRunner().invoke(app, ["transcribe", *map(str, paths)], env={"COLUMNS": "200"})
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.exit_code, lines, result.stderr


def test_a_file_of_several_digits_gives_one_line_each(tmp_path):
    """Five held-out recordings (index 5-9, never trained on) with 0.4 s of quiet between them."""
    digits = [3, 1, 4, 1, 5]
    speakers = ["george", "jackson", "lucas", "nicolas", "theo"]
    parts = [_silence(0.4)]
    for d, who in zip(digits, speakers, strict=True):
        parts += [_clip(f"{d}_{who}_6.wav"), _silence(0.4)]
    path = tmp_path / "pi.wav"
    soundfile.write(path, np.concatenate(parts), SR)
    code, lines, _ = _transcribe(path)
    assert code == 0
    assert [line["label"] for line in lines] == [str(d) for d in digits]
    assert all(0 < line["confidence"] <= 1 and line["start_s"] < line["end_s"] for line in lines)
    assert [line["start_s"] for line in lines] == sorted(line["start_s"] for line in lines)


def test_digits_in_quick_succession_each_get_a_line(tmp_path):
    """0.25 s between digits (about the pause between words of fluent speech)."""
    digits = [2, 7, 0, 9]
    speakers = ["jackson", "nicolas", "theo", "yweweler"]
    parts = [_silence(0.3)]
    for d, who in zip(digits, speakers, strict=True):
        parts += [_clip(f"{d}_{who}_8.wav"), _silence(0.25, seed=d)]
    path = tmp_path / "quick.wav"
    soundfile.write(path, np.concatenate(parts), SR)
    code, lines, _ = _transcribe(path)
    assert code == 0
    assert [line["label"] for line in lines] == [str(d) for d in digits]


def test_the_label_comes_at_most_150_ms_after_speech_ends():
    """Fed in 10 ms chunks: the recognition appears once the samples up to (speech end + delay) are in."""
    clip = _clip("8_yweweler_7.wav")
    loud = np.nonzero(np.abs(clip) > 0.05 * np.abs(clip).max())[0]
    speech_end = (0.3 * SR) + loud[-1]  # in samples of the padded signal
    audio = np.concatenate([_silence(0.3), clip, _silence(1.0)])
    rec = Recognizer(load_bundle(ASSET))
    try:
        step, got_at = SR // 100, None
        for start in range(0, len(audio), step):
            rec.push("mic", audio[start : start + step])
            if rec.tick():
                got_at = start + step
                break
    finally:
        rec.close()
    assert got_at is not None, "no utterance"
    delay_ms = (got_at - speech_end) / SR * 1000
    assert delay_ms <= 150, delay_ms


def test_labels_come_150_ms_after_speech_ends_typically():
    """Over 40 held-out recordings fed in 10 ms chunks: the median delay from the last sample above 5% of
    the peak amplitude to the label is at most 150 ms (README has the distribution)."""
    rec = Recognizer(load_bundle(ASSET))
    delays = []
    try:
        for k, path in enumerate(sorted(FSDD.glob("*_[5-9].wav"))[::8]):
            clip = _clip(path.name)
            loud = np.nonzero(np.abs(clip) > 0.05 * np.abs(clip).max())[0]
            pad = _silence(0.3, seed=k)
            audio = np.concatenate([pad, clip, _silence(1.0, seed=k + 1)])
            got = None
            for start in range(0, len(audio), SR // 100):
                rec.push(path.name, audio[start : start + SR // 100])
                if rec.tick() and got is None:
                    got = start + SR // 100
            rec.end(path.name)
            assert got is not None, f"{path.name}: no utterance"
            delays.append((got - len(pad) - loud[-1]) / SR * 1000)
    finally:
        rec.close()
    assert len(delays) >= 35
    assert np.median(delays) <= 150, delays


def _noises() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    t = np.arange(6 * SR) / SR
    hum = (
        0.2 * np.sin(2 * np.pi * 50 * t)
        + 0.1 * np.sin(2 * np.pi * 150 * t)
        + 0.05 * np.sin(2 * np.pi * 250 * t)
    )
    clicks = _silence(6.0)
    for at in np.arange(0.3, 6.0, 0.45):
        i = int(at * SR)
        clicks[i : i + 24] += rng.choice([-0.8, 0.8]) * np.exp(-np.arange(24) / 4)
    brown = np.cumsum(rng.normal(0, 1, len(t)))
    brown -= np.convolve(brown, np.ones(400) / 400, mode="same")  # keep it from drifting
    fan = 0.1 * brown / np.abs(brown).max() + 0.02 * rng.normal(0, 1, len(t))
    late_hum = np.concatenate([_silence(2.0), hum[: 4 * SR]])  # a hum that starts mid-stream
    return {"hum": hum, "clicks": clicks, "fan": fan, "late hum": late_hum}


@pytest.mark.parametrize("kind", ["hum", "clicks", "fan", "late hum"])
def test_noise_without_speech_makes_no_utterance(tmp_path, kind):
    path = tmp_path / f"{kind}.wav"
    soundfile.write(path, _noises()[kind].astype(np.float32), SR)
    code, lines, err = _transcribe(path)
    assert code == 0 and lines == [], lines
    assert "no speech found" in err


def test_bad_files_get_a_clear_message_and_the_others_go_on(tmp_path):
    clip = _clip("6_theo_9.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    soundfile.write(tmp_path / "silence.wav", np.zeros(SR, np.float32), SR)
    nan = clip.copy()
    nan[100] = np.nan
    soundfile.write(tmp_path / "nan.wav", nan, SR, subtype="FLOAT")
    soundfile.write(tmp_path / "good.wav", clip, SR)
    whole = (tmp_path / "good.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(whole[:30])
    soundfile.write(tmp_path / "stereo.wav", np.stack([clip, clip], axis=1), SR)
    soundfile.write(
        tmp_path / "rate44k.wav", __import__("librosa").resample(clip, orig_sr=SR, target_sr=44100), 44100
    )
    soundfile.write(tmp_path / "clipped.wav", np.clip(clip * 50, -1, 1), SR)
    names = ["empty", "silence", "nan", "truncated", "good", "stereo", "rate44k", "clipped"]
    code, lines, err = _transcribe(*(tmp_path / f"{n}.wav" for n in names))
    assert code == 1  # some files could not be used
    by_file = {Path(line["file"]).stem: line["label"] for line in lines}
    assert by_file == {"good": "6", "stereo": "6", "rate44k": "6", "clipped": "6"}, lines
    assert "empty.wav: error:" in err and "truncated.wav: error:" in err
    assert "nan.wav: error: 1 samples are NaN or infinite" in err
    assert "silence.wav: no speech found" in err
    assert (
        "stereo.wav: note: 2 channels mixed down" in err and "rate44k.wav: note: resampled from 44100" in err
    )
    assert "clipped.wav: note: clipped samples" in err


@pytest.mark.integration
@pytest.mark.mqtt
def test_recognitions_go_to_an_mqtt_sink_like_any_other_output(mqtt_broker, tmp_path):
    """``configs/digits-files.yaml`` with its sink swapped for MQTT: one message per utterance on
    digits/<stream>, read back by mosquitto_sub (an independent client)."""
    import subprocess
    import sys
    import time

    import yaml

    repo = Path(__file__).resolve().parents[2]
    cfg = yaml.safe_load((repo / "configs" / "digits-files.yaml").read_text())
    cfg["model"] = str(repo / "models" / "assets" / "digits_gru.safetensors")
    cfg["source"]["paths"] = [str(repo / "configs" / "data" / "digits.wav")]
    cfg["sink"] = {"type": "mqtt", "topic": "digits/{stream}", "qos": 1}
    cfg["mqtt"] = {"broker": mqtt_broker.address, "client_id": "digits-test"}
    path = tmp_path / "digits-mqtt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    host, port = mqtt_broker.address.split(":")
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", host, "-p", port, "-t", "digits/#", "-C", "3", "-W", "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # subscribed before anything is published
    run = subprocess.run(
        [sys.executable, "-m", "rnnstream.cli", "run", str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out, _ = sub.communicate(timeout=60)
    labels = [json.loads(line)["label"] for line in out.splitlines()]
    assert labels == ["3", "1", "4"], (out, run.stderr[-1000:])
