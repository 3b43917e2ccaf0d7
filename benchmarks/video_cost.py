"""What a video frame costs end to end (decode + features + model), through rnnstream and without it.

Cameras are MPEG-4 files of synthetic scenes (``rnnstream.video``), each frame ``difference`` features on a
12×16 grid (192 floats) into the motion detector's architecture, ``nn.GRU(192, 16)`` → ``nn.Linear(16, 2)``
(softmax).

- rnnstream: ``VideoSource`` over all cameras (decode, features, merged in frame-time order) →
  ``VideoDecoder`` → ``Engine.step_many`` in ticks of one frame per camera.
- baseline (what a user writes without rnnstream): per frame, decode and the same features
  (``connectors.video.Camera``), then the camera's own ``nn.GRU`` call on that one frame with the
  camera's kept ``h`` (batch 1), and the head. ``window_baseline``: instead, the module re-run over the
  camera's last ``WINDOW`` frames (a stateless server's sliding window).

Decoding dominates a frame's cost: the model's part is reported apart (``*_model_us_per_event``).

Run: ``python -m benchmarks.video_cost [--quick]`` (one torch thread).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from connectors.video import Camera, FrameFeatures, FrameVector, VideoDecoder, VideoSource, encode_video
from engine import Engine
from models import from_torch
from rnnstream.video import random_script, render

SETTINGS = FrameFeatures(("difference",), rows=12, cols=16)
HIDDEN = 16
WINDOW = 32


class _Assigned:
    def assigned(self, partitions: list[int]) -> None: ...

    def revoked(self, partitions: list[int]) -> None: ...

    def lost(self, partitions: list[int]) -> None: ...


def _cameras(root: Path, cameras: int, frames: int, scale: int) -> list[Path]:
    """``cameras`` MPEG-4 files of ``frames`` frames of ``(64·scale) × (96·scale)`` pixels."""
    rng = np.random.default_rng(0)
    paths = []
    for c in range(cameras):
        rgb = render(random_script(rng, frames), rng)
        rgb = rgb.repeat(scale, axis=1).repeat(scale, axis=2)
        paths.append(encode_video(root / f"cam{c}.mp4", rgb, bit_rate=4_000_000 * scale * scale))
    return paths


def _rnnstream(paths: list[Path], model: Any) -> tuple[float, float, int]:
    """``(total s, model s, frames)`` through the video source, decoder and engine."""
    decoder = VideoDecoder(SETTINGS.size)
    model_s, frames = 0.0, 0
    with Engine(model, device="cpu", capacity=len(paths), num_threads=1, max_batch=4096) as engine:
        started = time.perf_counter()
        source = VideoSource(paths, SETTINGS)
        source.open(_Assigned(), {})
        while not source.exhausted:
            messages = source.poll(0.0)
            for lo in range(0, len(messages), len(paths)):  # ticks: one frame per camera
                events = [decoder.decode(m) for m in messages[lo : lo + len(paths)]]
                ids, xs = [e.stream_id for e in events], np.concatenate([e.xs for e in events])
                step_started = time.perf_counter()
                engine.step_many(ids, xs)
                model_s += time.perf_counter() - step_started
                frames += len(ids)
        source.close()
        return time.perf_counter() - started, model_s, frames


def _baseline(
    paths: list[Path], gru: nn.GRU, head: nn.Linear, window: int | None
) -> tuple[float, float, int]:
    """``(total s, model s, frames)``: per frame, decode + features, then the module on that frame with the
    camera's ``h`` (``window`` None) or re-run over its last ``window`` frames."""
    model_s, frames = 0.0, 0
    started = time.perf_counter()
    cameras = [Camera(p, p.stem, SETTINGS, 25.0) for p in paths]
    states: list[torch.Tensor | None] = [None] * len(paths)
    pasts: list[deque[torch.Tensor]] = [deque(maxlen=window or 1) for _ in paths]
    live = list(range(len(paths)))
    with torch.no_grad():
        while live:
            for c in list(live):
                item = cameras[c].next()
                if not isinstance(item, FrameVector):
                    live.remove(c)
                    continue
                x = torch.from_numpy(item.features)[None]  # (1, F)
                step_started = time.perf_counter()
                if window is None:
                    out, states[c] = gru(x[None], states[c])
                else:
                    pasts[c].append(x)
                    out, _ = gru(torch.cat(list(pasts[c]))[:, None])
                torch.softmax(head(out[-1]), dim=-1)
                model_s += time.perf_counter() - step_started
                frames += 1
    return time.perf_counter() - started, model_s, frames


def measure(cameras: int, frames: int, scale: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    gru, head = nn.GRU(SETTINGS.size, HIDDEN).eval(), nn.Linear(HIDDEN, 2).eval()
    model = from_torch(gru, head=head, head_kind="classifier")
    with tempfile.TemporaryDirectory() as tmp:
        paths = _cameras(Path(tmp), cameras, frames, scale)
        runs = {
            "engine": lambda: _rnnstream(paths, model),
            "baseline": lambda: _baseline(paths, gru, head, None),
            "window": lambda: _baseline(paths, gru, head, WINDOW),
        }
        best: dict[str, tuple[float, float]] = {}
        for _ in range(rounds):
            for name, run in runs.items():
                total, model_s, n = run()
                assert n == cameras * frames, (name, n)
                us = (1e6 * total / n, 1e6 * model_s / n)
                best[name] = min(best.get(name, us), us)
    return {
        "architecture": "video frames (decode + features + GRU)",
        "setting": f"GRU-{HIDDEN}, {SETTINGS.size} difference features, {cameras} cameras "
        f"of {96 * scale}×{64 * scale} MPEG-4",
        "engine_us_per_event": best["engine"][0],
        "baseline": "per frame: decode + features, nn.GRU on that frame with the camera's h (batch 1)",
        "baseline_us_per_event": best["baseline"][0],
        "speedup": best["baseline"][0] / best["engine"][0],
        "window_baseline_us_per_event": best["window"][0],
        "window_speedup": best["window"][0] / best["engine"][0],
        "engine_model_us_per_event": best["engine"][1],
        "baseline_model_us_per_event": best["baseline"][1],
        "window_baseline_model_us_per_event": best["window"][1],
    }


def rows(quick: bool) -> list[dict[str, object]]:
    """96×64 and 384×256 cameras (quick: 16 cameras of 30 frames, best of two rounds)."""
    torch.set_num_threads(1)
    if quick:
        return [measure(16, 30, scale, rounds=2) for scale in (1, 4)]
    return [measure(64, 100, scale, rounds=3) for scale in (1, 4)]


if __name__ == "__main__":  # one table with the machine named: the architectures benchmark, this row alone
    from benchmarks.architectures_bench import main

    sys.exit(main(["--only", "video_cost", *sys.argv[1:]]))
