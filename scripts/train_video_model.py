"""Train the video motion example's model: ``models/assets/video_motion_gru.safetensors``.

``nn.GRU(192, 16)`` → ``nn.Linear(16, 2)`` (classifier head: ``[P(static), P(event)]``) reads each frame's
``difference`` features on a 12×16 grid (``connectors.video.FrameFeatures``: ``|grey_t - grey_{t-1}|``
per cell, in [0, 1]) and says whether the picture changed because an object moved or the scene was cut
(``rnnstream.video``: synthetic scenes only, rendered, encoded to MPEG-4 and decoded back through the
video source's own decoder, so the codec's noise is in the training data). It is a learned, temporally
smoothed threshold on where and how much the picture changed; it knows nothing about object classes.
The example video ``configs/data/camera.mp4`` is written too (a different seed from training).

Deterministic for a given ``--seed``; about a minute on 2 CPU cores.

    python scripts/train_video_model.py [--seed 0] [--videos 240]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import models
from connectors.video import Camera, FrameFeatures, FrameVector, encode_video
from rnnstream.video import Script, bundle_features, random_script, render

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "models" / "assets" / "video_motion_gru.safetensors"
EXAMPLE_VIDEO = ROOT / "configs" / "data" / "camera.mp4"
SETTINGS = FrameFeatures(("difference",), rows=12, cols=16)
HIDDEN = 16
LENGTH = 60
EXAMPLE = Script(120, moving=((30, 60),), cuts=(90,))  # still, moving, still, cut, still


def decoded_features(frames: np.ndarray, directory: Path, name: str) -> np.ndarray:
    """``(T, SETTINGS.size) float32``: ``frames`` encoded to MPEG-4 and read back by ``Camera``."""
    path = encode_video(directory / f"{name}.mp4", frames)
    camera = Camera(path, name, SETTINGS, fps=25.0)
    rows = []
    while isinstance(item := camera.next(), FrameVector):
        rows.append(item.features)
    assert item is None, item
    return np.stack(rows)


def dataset(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xs (T, n, F), ys (T, n))`` of ``n`` random scenes."""
    xs, ys = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            script = random_script(rng, LENGTH)
            xs.append(decoded_features(render(script, rng), Path(tmp), f"v{i}"))
            ys.append(script.labels())
    return torch.as_tensor(np.stack(xs, 1)), torch.as_tensor(np.stack(ys, 1))


def train(xs: torch.Tensor, ys: torch.Tensor, seed: int, epochs: int) -> tuple[nn.GRU, nn.Linear, float]:
    torch.manual_seed(seed)
    gru, head = nn.GRU(SETTINGS.size, HIDDEN), nn.Linear(HIDDEN, 2)
    opt = torch.optim.Adam([*gru.parameters(), *head.parameters()], lr=1e-2)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for batch in torch.randperm(xs.shape[1]).split(32):
            out, _ = gru(xs[:, batch])
            loss = nn.functional.cross_entropy(head(out).reshape(-1, 2), ys[:, batch].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return gru.eval(), head.eval(), float(loss.detach())


def accuracy(gru: nn.GRU, head: nn.Linear, xs: torch.Tensor, ys: torch.Tensor) -> float:
    with torch.no_grad():
        out, _ = gru(xs)
        return float((head(out).argmax(-1) == ys).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videos", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.monotonic()
    rng = np.random.default_rng(args.seed)
    xs, ys = dataset(args.videos, rng)
    held_xs, held_ys = dataset(max(args.videos // 4, 1), np.random.default_rng(args.seed + 1))
    gru, head, loss = train(xs, ys, args.seed, args.epochs)
    held = accuracy(gru, head, held_xs, held_ys)
    model = models.from_torch(gru, head=head, head_kind="classifier")
    model.info.version = 1
    model.info.features = {"video": bundle_features(SETTINGS), "labels": ["static", "event"]}
    model.info.trained_on = {
        "data": "synthetic scenes (rnnstream.video), MPEG-4 encoded and decoded",
        "seed": args.seed,
        "videos": args.videos,
        "frames_per_video": LENGTH,
        "epochs": args.epochs,
        "final_loss": round(loss, 4),
        "held_out_accuracy": round(held, 4),
    }
    path = models.save_bundle(model, args.out)
    EXAMPLE_VIDEO.parent.mkdir(parents=True, exist_ok=True)
    encode_video(EXAMPLE_VIDEO, render(EXAMPLE, np.random.default_rng(12345)))
    took = time.monotonic() - started
    print(
        f"wrote {path} (loss {loss:.4f}, held-out frame accuracy {held:.4f}) and {EXAMPLE_VIDEO}"
        f" in {took:.0f} s"
    )


if __name__ == "__main__":
    main()
