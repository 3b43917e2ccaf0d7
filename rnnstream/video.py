"""The video motion example: synthetic camera scenes (training data of ``scripts/train_video_model.py``, test
videos, the benchmark's cameras) and the frame-feature settings a model bundle ships.

A scene is a textured background with one rectangle on it. The rectangle moves (a few pixels a frame)
during some intervals and stands still otherwise; at a scene cut, background and rectangle change at once.
The label of frame ``t`` is 1 ("event") when the picture changed since frame ``t-1`` because the object
moved or the scene was cut, else 0 ("static"). ``models/assets/video_motion_gru.safetensors`` is a GRU
reading ``difference`` features (``connectors.video.FrameFeatures``) trained on such scenes to give
``P(event)`` per frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from connectors.video import FrameFeatures

HEIGHT, WIDTH = 64, 96  # pixels of the synthetic scenes (even: yuv420p)


@dataclass(frozen=True)
class Script:
    """What happens in a scene of ``length`` frames: the object moves on frames in ``moving`` (half-open
    ``(start, end)`` intervals: its position at frame ``t`` differs from ``t-1``), the scene is cut at the
    frames in ``cuts``."""

    length: int
    moving: tuple[tuple[int, int], ...] = ()
    cuts: tuple[int, ...] = ()

    def labels(self) -> np.ndarray:
        """``(length,) int64``: 1 where the picture changed by motion or a cut, else 0."""
        y = np.zeros(self.length, np.int64)
        for start, end in self.moving:
            y[start:end] = 1
        y[list(self.cuts)] = 1
        return y


def _background(rng: np.random.Generator) -> np.ndarray:
    """``(HEIGHT, WIDTH, 3) float`` in [0, 255]: a smooth random texture (an 4×6 colour grid, upsampled)."""
    coarse = rng.uniform(0, 255, (4, 6, 3))
    return np.kron(coarse, np.ones((HEIGHT // 4, WIDTH // 6, 1)))


def render(script: Script, rng: np.random.Generator) -> np.ndarray:
    """``(length, HEIGHT, WIDTH, 3) uint8`` RGB frames playing ``script``."""
    frames = np.empty((script.length, HEIGHT, WIDTH, 3), np.uint8)
    moving = script.labels().astype(bool) & ~np.isin(np.arange(script.length), script.cuts)
    background = size = colour = position = velocity = None
    for t in range(script.length):
        if t == 0 or t in script.cuts:
            background = _background(rng)
            size = rng.integers(8, 20, 2)
            colour = rng.uniform(0, 255, 3)
            position = rng.uniform(0, 1, 2) * (np.array([HEIGHT, WIDTH]) - size)
            velocity = rng.uniform(1.5, 4, 2) * rng.choice([-1, 1], 2)
        if moving[t]:
            position, velocity = _bounce(position + velocity, velocity, np.array([HEIGHT, WIDTH]) - size)
        frame = background.copy()
        top, left = position.astype(int)
        frame[top : top + size[0], left : left + size[1]] = colour
        frames[t] = frame.astype(np.uint8)
    return frames


def _bounce(position: np.ndarray, velocity: np.ndarray, limit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object kept inside ``[0, limit]``: reflected at the edges, its velocity reversed there."""
    out = (position < 0) | (position > limit)
    velocity = np.where(out, -velocity, velocity)
    return np.clip(position, 0, limit), velocity


def random_script(rng: np.random.Generator, length: int) -> Script:
    """A random scene: up to three motion intervals and up to two cuts, at random frames."""
    moving = []
    for _ in range(rng.integers(0, 4)):
        start = int(rng.integers(1, length - 2))
        moving.append((start, int(min(length, start + rng.integers(2, length // 3)))))
    cuts = tuple(sorted({int(c) for c in rng.integers(1, length, rng.integers(0, 3))}))
    return Script(length, tuple(moving), cuts)


def features_of_bundle(features: Mapping[str, Any]) -> FrameFeatures | None:
    """The ``FrameFeatures`` a model bundle was trained with (its ``info.features["video"]``), or ``None``."""
    video = features.get("video")
    if not isinstance(video, Mapping):
        return None
    return FrameFeatures(tuple(video["kinds"]), int(video["rows"]), int(video["cols"]), int(video["bins"]))


def bundle_features(settings: FrameFeatures) -> dict[str, Any]:
    """``settings`` as a bundle's ``info.features["video"]`` (read back by ``features_of_bundle``)."""
    return {
        "kinds": list(settings.kinds),
        "rows": settings.rows,
        "cols": settings.cols,
        "bins": settings.bins,
    }
