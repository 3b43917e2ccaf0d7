"""The spoken-digit recognizer: a GRU over streaming MFCCs, trained on the Free Spoken Digit Dataset
(``rnnstream train digits``).

Features are exactly what the audio path computes live (``connectors.audio``, 8 kHz, 32 ms frames every
10 ms); the model is ``nn.GRU(n_mfcc, hidden, layers)`` read at the utterance's last frame by
``nn.Linear(hidden, 10)``: a many-to-one model the engine runs one frame per event, its label coming out
with the stream's end (``Engine.end``). The per-coefficient feature normalisation is folded into the
GRU's first-layer input weights, so the bundle takes raw MFCCs.

Augmentation, drawn afresh every epoch (deterministic for a seed), so that it holds up on a live
microphone: gain (-12..+6 dB, then clipping to [-1, 1]), speed (0.9..1.1 by resampling), a round trip
through 44.1 or 48 kHz, white noise at 5..30 dB SNR, and leading/trailing silence with a noise floor.

Split: FSDD's standard test split is recordings 0-4 of every digit and speaker (not in
``../shared/data/fsdd``); the shared recordings are 5-49. Recordings 5-9 are held out here as our own
test split of the same shape (300 files); 10-49 train.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import librosa
import numpy as np
import soundfile
import torch
from torch import nn

import models
from connectors.audio import MFCCSettings, mfcc_of

SAMPLE_RATE = 8000
FEATURES = MFCCSettings(SAMPLE_RATE, n_mfcc=20, n_fft=256, hop_length=80, n_mels=40, fmin=20.0, fmax=4000.0)
NAME = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav$")
ASSET = Path(models.__file__).parent / "assets" / "digits_gru.safetensors"


@dataclass
class DigitsConfig:
    seed: int = 0
    hidden: int = 128
    layers: int = 2
    epochs: int = 40
    batch: int = 64
    lr: float = 3e-3
    held_out: tuple[int, int] = (5, 9)  # recording indices kept out of training (inclusive)
    held_out_speaker: str | None = None  # instead: all of one speaker's recordings (leave one speaker out)
    threads: int = 2


@dataclass(frozen=True)
class Recording:
    path: Path
    digit: int
    speaker: str
    index: int
    audio: np.ndarray  # float32 samples at 8 kHz


def load_recordings(folder: Path) -> list[Recording]:
    """Every ``{digit}_{speaker}_{index}.wav`` in ``folder``, as 8 kHz mono float32, sorted by name."""
    out = []
    for path in sorted(folder.glob("*.wav")):
        m = NAME.search(path.name)
        if m is None:
            continue
        audio, sr = soundfile.read(path, dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
        if sr != SAMPLE_RATE:
            audio = librosa.resample(audio, orig_sr=sr, target_sr=SAMPLE_RATE)
        out.append(Recording(path, int(m[1]), m[2], int(m[3]), audio.astype(np.float32)))
    return out


def augment(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random variant of ``audio`` (see the module docstring), float32 at 8 kHz."""
    x = audio.astype(np.float32)
    speed = rng.uniform(0.9, 1.1)
    x = librosa.resample(x, orig_sr=SAMPLE_RATE, target_sr=round(SAMPLE_RATE / speed))
    if rng.random() < 0.3:
        high = int(rng.choice([44100, 48000]))
        x = librosa.resample(
            librosa.resample(x, orig_sr=SAMPLE_RATE, target_sr=high), orig_sr=high, target_sr=SAMPLE_RATE
        )
    x = x * 10 ** (rng.uniform(-12, 6) / 20)
    lead, trail = rng.integers(0, int(0.15 * SAMPLE_RATE), 2)
    x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(trail, np.float32)])
    power = float(np.mean(x**2)) + 1e-12
    snr_db = rng.uniform(5, 30) if rng.random() < 0.6 else 60.0
    x = x + rng.normal(0, np.sqrt(power / 10 ** (snr_db / 10)), len(x)).astype(np.float32)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def features(audio: np.ndarray) -> np.ndarray:
    """MFCCs of a whole recording, ``(frames, n_mfcc)``; as the live path computes them."""
    if len(audio) < FEATURES.n_fft:
        audio = np.concatenate([audio, np.zeros(FEATURES.n_fft - len(audio), np.float32)])
    return mfcc_of(audio, FEATURES)


class DigitNet(nn.Module):
    """GRU over MFCC frames, linear read-out of the last valid frame's top hidden state."""

    def __init__(self, cfg: DigitsConfig, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.gru = nn.GRU(FEATURES.n_mfcc, cfg.hidden, cfg.layers)
        self.head = nn.Linear(cfg.hidden, 10)
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x: ``(T, B, n_mfcc)`` raw MFCCs, padded; lengths: ``(B,)`` → logits ``(B, 10)``."""
        packed = nn.utils.rnn.pack_padded_sequence((x - self.mean) / self.std, lengths, enforce_sorted=False)
        _, h = self.gru(packed)
        return self.head(h[-1])


def _batches(feats: list[np.ndarray], labels: np.ndarray, batch: int, rng: np.random.Generator):
    order = rng.permutation(len(feats))
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        seqs = [torch.from_numpy(feats[i]) for i in idx]
        yield (
            nn.utils.rnn.pad_sequence(seqs),
            torch.tensor([len(s) for s in seqs]),
            torch.from_numpy(labels[idx]),
        )


@torch.no_grad()
def accuracy(net: DigitNet, feats: list[np.ndarray], labels: np.ndarray) -> float:
    net.eval()
    seqs = [torch.from_numpy(f) for f in feats]
    logits = net(nn.utils.rnn.pad_sequence(seqs), torch.tensor([len(s) for s in seqs]))
    net.train()
    return float((logits.argmax(1).numpy() == labels).mean())


def train(recordings: list[Recording], cfg: DigitsConfig, log: list[dict]) -> tuple[DigitNet, dict]:
    """Train on the recordings outside ``cfg.held_out``; returns the net and the held-out accuracy."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    lo, hi = cfg.held_out

    def held(r: Recording) -> bool:
        return r.speaker == cfg.held_out_speaker if cfg.held_out_speaker else lo <= r.index <= hi

    train_set = [r for r in recordings if not held(r)]
    test_set = [r for r in recordings if held(r)]
    clean = [features(r.audio) for r in train_set]
    stacked = np.concatenate(clean)
    mean, std = stacked.mean(0).astype(np.float32), (stacked.std(0) + 1e-3).astype(np.float32)
    labels = np.array([r.digit for r in train_set])
    test_feats, test_labels = [features(r.audio) for r in test_set], np.array([r.digit for r in test_set])
    net = DigitNet(cfg, mean, std)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * -(-len(train_set) // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        feats = [features(augment(r.audio, rng)) for r in train_set]
        losses = []
        for x, lengths, y in _batches(feats, labels, cfg.batch, rng):
            loss = nn.functional.cross_entropy(net(x, lengths), y, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        entry = {
            "epoch": epoch + 1,
            "loss": round(float(np.mean(losses)), 5),
            "held_out_accuracy": round(accuracy(net, test_feats, test_labels), 4),
            "seconds": round(time.perf_counter() - started, 1),
        }
        log.append(entry)
        print(json.dumps(entry), flush=True)
    return net, {"held_out_accuracy": accuracy(net, test_feats, test_labels), "held_out_files": len(test_set)}


def to_stream_model(net: DigitNet, cfg: DigitsConfig, result: dict) -> models.StreamModel:
    """The streamable bundle: normalisation folded into the first layer, classifier head."""
    gru = nn.GRU(FEATURES.n_mfcc, cfg.hidden, cfg.layers)
    gru.load_state_dict(net.gru.state_dict())
    with torch.no_grad():  # W·((x - μ)/σ) + b = (W/σ)·x + (b - W·μ/σ)
        w = gru.weight_ih_l0 / net.std
        gru.bias_ih_l0 -= w @ net.mean
        gru.weight_ih_l0.copy_(w)
    model = models.from_torch(gru, head=net.head, head_kind="classifier")
    model.info.version = 1
    s = FEATURES
    model.info.features = {
        "kind": "audio",
        "task": "spoken digits 0-9, one label per utterance (read at its end)",
        "labels": [str(d) for d in range(10)],
        "mfcc": {
            "sample_rate": s.sample_rate,
            "n_mfcc": s.n_mfcc,
            "n_fft": s.n_fft,
            "hop_length": s.hop_length,
            "n_mels": s.n_mels,
            "fmin": s.fmin,
            "fmax": s.fmax,
        },
    }
    model.info.trained_on = {
        "script": "rnnstream train digits (rnnstream/digits.py)",
        "data": "Free Spoken Digit Dataset, "
        + (
            f"all speakers but {cfg.held_out_speaker}"
            if cfg.held_out_speaker
            else "recordings 10-49 (5-9 held out)"
        ),
        **{k: v for k, v in asdict(cfg).items() if k != "threads"},
        **result,
    }
    return model


def main(data: Path, out: Path = ASSET, cfg: DigitsConfig | None = None) -> dict:
    """Train, save ``out`` and its log ``out`` with ``.log.json``; returns the result."""
    cfg = cfg or DigitsConfig()
    recordings = load_recordings(data)
    if not recordings:
        raise FileNotFoundError(f"no FSDD recordings ({{digit}}_{{speaker}}_{{index}}.wav) in {data}")
    log: list[dict] = []
    started = time.perf_counter()
    net, result = train(recordings, cfg, log)
    result["train_seconds"] = round(time.perf_counter() - started, 1)
    models.save_bundle(to_stream_model(net, cfg, result), out)
    out.with_suffix(".log.json").write_text(
        json.dumps({"config": asdict(cfg), "epochs": log, **result}, indent=1)
    )
    return result
