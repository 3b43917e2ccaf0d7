"""The spoken-digit recognizer (``rnnstream.digits``): streamed equals offline, accuracy on our held-out
recordings, and the training command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from connectors.audio import StreamingMFCC
from engine import Engine
from models import load_bundle
from rnnstream.digits import ASSET, FEATURES, DigitsConfig, features, load_recordings, main

FSDD = Path(__file__).resolve().parents[3] / "shared" / "data" / "fsdd" / "recordings"


@pytest.fixture(scope="module")
def held_out():
    if not FSDD.exists():
        pytest.fail(f"the shared FSDD recordings are missing: {FSDD}")
    return [r for r in load_recordings(FSDD) if 5 <= r.index <= 9]


@pytest.fixture(scope="module")
def model():
    return load_bundle(ASSET).eval()


def test_streamed_audio_gives_the_offline_prediction(held_out, model):
    """Samples in uneven chunks → streaming MFCC → one engine step per frame → label at the end; equals
    the bundle run offline over the whole recording's features (1e-5)."""
    rng = np.random.default_rng(0)
    with Engine(model, max_delay_ms=0) as engine:
        for rec in held_out[::37]:
            mfcc = StreamingMFCC.of(FEATURES)
            pos, sid = 0, rec.path.name
            while pos < len(rec.audio):
                n = int(rng.integers(1, 1500))
                frames = mfcc.push(rec.audio[pos : pos + n])
                pos += n
                if len(frames):
                    engine.step_many([sid] * len(frames), frames)
            streamed = engine.end(sid)
            with torch.no_grad():
                out, _ = model(torch.from_numpy(features(rec.audio))[:, None])
            offline = out[-1, 0].numpy()
            assert np.abs(streamed - offline).max() < 1e-5
            assert int(np.argmax(streamed)) == int(np.argmax(offline))


def test_accuracy_on_our_held_out_recordings(held_out, model):
    """Recordings 5-9 of every digit and speaker (300 files), never trained on; README has the figure."""
    correct = 0
    with torch.no_grad():
        for rec in held_out:
            out, _ = model(torch.from_numpy(features(rec.audio))[:, None])
            correct += int(out[-1, 0].argmax()) == rec.digit
    assert len(held_out) == 300
    assert correct / len(held_out) >= 0.96, correct


def test_the_training_command_writes_a_bundle_and_its_log(tmp_path):
    data = tmp_path / "fsdd"
    data.mkdir()
    for d in range(10):
        for i in (5, 6, 10, 11):
            shutil.copy(FSDD / f"{d}_george_{i}.wav", data)
    result = main(data, tmp_path / "digits.safetensors", DigitsConfig(epochs=1, hidden=16, layers=1))
    assert result["held_out_files"] == 20 and 0 <= result["held_out_accuracy"] <= 1
    log = json.loads((tmp_path / "digits.log.json").read_text())
    assert len(log["epochs"]) == 1 and log["config"]["hidden"] == 16
    assert load_bundle(tmp_path / "digits.safetensors").info.features["labels"][7] == "7"


def test_leaving_one_speaker_out_holds_out_all_their_recordings(tmp_path):
    data = tmp_path / "fsdd"
    data.mkdir()
    for d in range(10):
        for who in ("george", "theo"):
            shutil.copy(FSDD / f"{d}_{who}_20.wav", data)
    cfg = DigitsConfig(epochs=1, hidden=8, layers=1, held_out_speaker="theo")
    result = main(data, tmp_path / "loso.safetensors", cfg)
    assert result["held_out_files"] == 10
    assert "all speakers but theo" in load_bundle(tmp_path / "loso.safetensors").info.trained_on["data"]


def test_accuracy_through_the_live_path(held_out):
    """The same 300 held-out files through everything a live stream goes through (``transcribe``: chunks,
    MFCC, endpointing, the recognizer stepped while the digit is spoken): exactly one line with the right
    digit per file. README has the figure (99.3%)."""
    from rnnstream.speech import transcribe

    results = transcribe([r.path for r in held_out])
    right = sum(
        [line["label"] for line in res.recognitions] == [str(r.digit)]
        for r, res in zip(held_out, results, strict=True)
    )
    assert right / len(held_out) >= 0.97, right
