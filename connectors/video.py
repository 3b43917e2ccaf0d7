"""Video files and image sequences replayed as streams of frame feature vectors (PyAV: FFmpeg's decoders,
bundled in its wheels; nothing is downloaded, no pretrained weights).

One camera = one stream: a video file (anything FFmpeg demuxes: mp4, avi, mkv, ...) or a directory of
still images (png, jpg, bmp, ..., in name order, ``fps`` frames a second). Each decoded frame becomes one
feature vector (``FrameFeatures``), the concatenation of the kinds asked for, in their order:

- ``grey``: the frame's luma averaged over a ``rows × cols`` grid (area average), ``(rows·cols,)``
  float32 in [0, 1] (0 black, 1 white), row-major.
- ``difference``: ``|grey_t - grey_{t-1}|`` on the same grid, ``(rows·cols,)`` float32 in [0, 1]; all
  zeros for a camera's first frame. Motion and scene cuts show up here.
- ``histogram``: the fraction of pixels in each of ``bins`` equal-width intensity bins of R, G and B,
  over the frame scaled (area average) to ``HISTOGRAM_SIZE``: ``(3·bins,)`` float32 in [0, 1], each
  channel's bins summing to 1.

``VideoSource`` is a ``connectors.base.Source``, ``replayable`` like the CSV source: a message's
position is its frame's index in its camera (0, 1, ...), ``positions()`` is ``{"frames": {path: frames
emitted}}``, and a restart from those positions decodes and drops the frames already emitted (decoding
is deterministic), so a checkpointed pipeline killed at any moment loses no frame and applies none twice.
Cameras are merged in frame-time order (ties by camera order); ``speed=None`` replays as fast as the
pipeline takes frames, ``speed=1`` at the videos' own pace.

A camera whose file is not a video (garbage bytes), has no video stream, frames of zero or gigantic
size, fails to decode, or ends before the length its container declares (truncated) gives one
``BadVideo`` message, which ``VideoDecoder`` turns into a dead letter with the reason; that camera stops
there and the others go on.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from connectors.base import Assignment, Guarantee, Message
from connectors.codec import Decoded, DecodeError, refusing

log = logging.getLogger("connectors.video")

FeatureKind = Literal["grey", "difference", "histogram"]
FEATURE_KINDS: tuple[FeatureKind, ...] = ("grey", "difference", "histogram")
HISTOGRAM_SIZE = (160, 120)  # (width, height) the frame is scaled to before its colour histogram
MAX_PIXELS = 7680 * 4320  # a larger frame (8K and beyond) is refused: a hostile header must not cost GBs
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
TRUNCATION_TOLERANCE = 2  # frames: a file may end this many frames short of its declared length
MAX_BATCH = 4096  # frames per poll
POLL_DECODE_S = 0.1  # a poll stops decoding after this long (large frames): the pipeline gets to run


class VideoUnusable(ValueError):
    """A camera's input that cannot be used (not a video, no video stream, broken frames), with the reason."""


@dataclass(frozen=True)
class FrameFeatures:
    """Which feature vector each frame becomes (see the module docstring for shapes and units)."""

    kinds: tuple[FeatureKind, ...] = ("grey",)
    rows: int = 12
    cols: int = 16
    bins: int = 8

    def __post_init__(self) -> None:
        if not self.kinds or any(k not in FEATURE_KINDS for k in self.kinds):
            raise ValueError(f"features must be a non-empty list of {FEATURE_KINDS}, got {self.kinds!r}")
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"a feature kind is listed twice: {self.kinds!r}")
        if not (1 <= self.rows <= 1024 and 1 <= self.cols <= 1024 and 1 <= self.bins <= 256):
            raise ValueError(f"rows, cols must be in 1..1024 and bins in 1..256, got {self}")

    @property
    def size(self) -> int:
        """Features per frame: ``rows·cols`` per grid kind plus ``3·bins`` for the histogram."""
        per_kind = {
            "grey": self.rows * self.cols,
            "difference": self.rows * self.cols,
            "histogram": 3 * self.bins,
        }
        return sum(per_kind[k] for k in self.kinds)

    def grey(self, frame: av.VideoFrame, scaler: VideoReformatter | None = None) -> np.ndarray:
        """``(rows, cols) float32`` in [0, 1]: the frame's luma, area-averaged onto the grid. ``scaler``:
        a camera's own, which keeps its scaling context from frame to frame (5× faster than a new one)."""
        scaler = scaler or VideoReformatter()
        small = scaler.reformat(frame, width=self.cols, height=self.rows, format="gray", interpolation="AREA")
        return small.to_ndarray().astype(np.float32) / np.float32(255.0)

    def histogram(self, frame: av.VideoFrame, scaler: VideoReformatter | None = None) -> np.ndarray:
        """``(3·bins,) float32``: per channel R, G, B, the fraction of pixels whose value ``v`` (0..255)
        falls in bin ``⌊v · bins / 256⌋``."""
        width, height = HISTOGRAM_SIZE
        scaler = scaler or VideoReformatter()
        rgb = scaler.reformat(
            frame, width=width, height=height, format="rgb24", interpolation="AREA"
        ).to_ndarray()
        bin_of = (rgb.astype(np.int32) * self.bins) >> 8  # (H, W, 3) in 0..bins-1
        counts = np.bincount((bin_of + np.arange(3) * self.bins).ravel(), minlength=3 * self.bins)
        return (counts / np.float32(width * height)).astype(np.float32)

    def of(
        self,
        frame: av.VideoFrame,
        previous_grey: np.ndarray | None,
        scalers: tuple[VideoReformatter, VideoReformatter] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(features (size,) float32, grey (rows, cols))`` of ``frame``; ``previous_grey`` is the camera's
        previous frame's grid (``None`` for its first frame: zero difference); ``scalers``: the camera's
        own for the grid and the histogram."""
        grey_scaler, histogram_scaler = scalers or (None, None)
        grey = self.grey(frame, grey_scaler)
        parts = []
        for kind in self.kinds:
            if kind == "grey":
                parts.append(grey.ravel())
            elif kind == "difference":
                before = grey if previous_grey is None else previous_grey
                parts.append(np.abs(grey - before).ravel())
            else:
                parts.append(self.histogram(frame, histogram_scaler))
        return np.concatenate(parts), grey


@dataclass(frozen=True, slots=True)
class FrameVector:
    """A message payload: one frame's ``features (F,) float32``, its ``time_s`` in the video (seconds)
    and its ``index`` in the camera (0, 1, ...)."""

    features: np.ndarray
    time_s: float
    index: int


@dataclass(frozen=True, slots=True)
class BadVideo:
    """A payload standing for a camera's refused input; the decoder dead-letters it with ``reason``."""

    reason: str


# ---- decoding one camera ----------------------------------------------------------------------------
def _checked(frame: av.VideoFrame) -> av.VideoFrame:
    if frame.width <= 0 or frame.height <= 0:
        raise VideoUnusable(f"a frame of size {frame.width}×{frame.height}")
    if frame.width * frame.height > MAX_PIXELS:
        raise VideoUnusable(f"frames of {frame.width}×{frame.height} pixels: more than {MAX_PIXELS}")
    return frame


def _video_frames(path: Path) -> Iterator[tuple[av.VideoFrame, float | None]]:
    """A video file's frames with their times (seconds; ``None`` when the file gives none). Raises
    ``VideoUnusable`` (not a video, no video stream, oversized or empty frames, truncated)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoUnusable("no video stream")
        stream = container.streams.video[0]
        if stream.width * stream.height > MAX_PIXELS:
            raise VideoUnusable(f"frames of {stream.width}×{stream.height} pixels: more than {MAX_PIXELS}")
        declared = _declared_frames(container, stream)
        decoded = 0
        for frame in container.decode(stream):
            decoded += 1
            yield _checked(frame), frame.time
        if decoded == 0:
            raise VideoUnusable("no frame could be decoded (empty or truncated file)")
        if declared is not None and decoded + TRUNCATION_TOLERANCE < declared:
            raise VideoUnusable(f"truncated: {decoded} frames decoded of the {declared} the file declares")


def _declared_frames(container: Any, stream: Any) -> int | None:
    """The frame count the container declares: its stream's count, else its duration × frame rate (the
    container's duration only when the video is its one stream: an audio track may outlast the video)."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        return None
    if stream.duration and stream.time_base:
        return round(float(stream.duration * stream.time_base) * float(rate))
    if container.duration and len(container.streams) == 1:
        return round(container.duration / 1e6 * float(rate))  # container.duration: microseconds
    return None


def _image_frames(directory: Path, fps: float) -> Iterator[tuple[av.VideoFrame, float | None]]:
    """A directory's images in name order, one frame each, frame ``k`` at ``k / fps`` seconds."""
    images = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise VideoUnusable(f"no image ({', '.join(sorted(IMAGE_SUFFIXES))}) in the directory")
    for k, image in enumerate(images):
        try:
            with av.open(str(image)) as container:
                frame = next(container.decode(video=0), None)
        except Exception as exc:
            raise VideoUnusable(f"{image.name}: {type(exc).__name__}: {exc}") from exc
        if frame is None:
            raise VideoUnusable(f"{image.name}: no picture in it")
        yield _checked(frame), k / fps


class Camera:
    """One camera's frames as feature vectors, decoded lazily (one frame in memory).

    ``next()`` returns the next ``FrameVector`` or ``None`` when the camera is done; a failure (opening or
    decoding) is returned once as ``BadVideo`` and the camera is done after it. ``frames`` counts the
    frames returned."""

    def __init__(self, path: Path, name: str, features: FrameFeatures, fps: float) -> None:
        self.path, self.name, self.features, self.fps = path, name, features, fps
        self.frames = 0
        self._previous: np.ndarray | None = None
        self._scalers = (VideoReformatter(), VideoReformatter())  # grid, histogram
        self._iterator: Iterator[tuple[av.VideoFrame, float | None]] | None = None
        self.done = False

    def _open(self) -> Iterator[tuple[av.VideoFrame, float | None]]:
        if self.path.is_dir():
            return _image_frames(self.path, self.fps)
        return _video_frames(self.path)

    def next(self) -> FrameVector | BadVideo | None:
        if self.done:
            return None
        try:
            if self._iterator is None:
                self._iterator = self._open()
            item = next(self._iterator, None)
            if item is None:
                self.close()
                return None
            frame, time_s = item
            x, self._previous = self.features.of(frame, self._previous, self._scalers)
        except Exception as exc:
            self.close()
            reason = (
                str(exc) if isinstance(exc, VideoUnusable) else f"cannot decode: {type(exc).__name__}: {exc}"
            )
            return BadVideo(f"{self.path}: {reason}"[:1000])
        index = self.frames
        self.frames += 1
        return FrameVector(x, index / self.fps if time_s is None else float(time_s), index)

    def skip(self, count: int) -> BadVideo | None:
        """Decode and drop ``count`` frames (a restart's resume); a failure among them is returned."""
        for _ in range(count):
            item = self.next()
            if not isinstance(item, FrameVector):
                return item
        return None

    def close(self) -> None:
        self.done = True
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()  # closes the container of a generator stopped early
            self._iterator = None


class VideoSource:
    """Replays ``paths`` (video files, or directories of images) as one partition, 0; ``replayable``.

    - ``features``: what each frame becomes (``FrameFeatures``).
    - ``speed``: ``None`` as fast as possible; else ``speed`` times the videos' real pace.
    - ``fps``: the frame rate of image directories (and of a video whose frames carry no time).
    - ``names``: the stream ids, one per path (default: each path's stem, which must then be unique).

    ``Message.key`` is the camera's stream id, ``position`` the frame's index in its camera, ``topic`` the
    path; the payload a ``FrameVector`` or a ``BadVideo``."""

    guarantee: Guarantee = "replayable"

    def __init__(
        self,
        paths: Sequence[str | Path],
        features: FrameFeatures | None = None,
        speed: float | None = None,
        fps: float = 25.0,
        names: Sequence[str] | None = None,
    ) -> None:
        if not paths:
            raise ValueError("video source: no files given")
        if speed is not None and not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a positive number of times real pace, got {speed!r}")
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be positive, got {fps!r}")
        self.paths = [Path(p) for p in paths]
        self.names = list(names) if names is not None else [p.stem for p in self.paths]
        if len(self.names) != len(self.paths):
            raise ValueError(f"video source: {len(self.names)} names for {len(self.paths)} files")
        if len(set(self.names)) != len(self.names) or len({str(p) for p in self.paths}) != len(self.paths):
            raise ValueError(f"video source: two cameras share a path or a name: {self.names}")
        self.features = features or FrameFeatures()
        self.speed, self.fps = speed, fps
        self._cameras: list[Camera] = []
        self._heap: list[tuple[float, int, FrameVector | BadVideo]] = []
        self._emitted = [0] * len(self.paths)  # per camera: frames returned by poll
        self._committed: dict[str, int] = {}
        self._opened = False
        self._pace: tuple[float, float] | None = None  # (wall anchor, frame-time anchor)

    # ---- Source --------------------------------------------------------------------------------------
    def open(self, assignment: Assignment, resume: Mapping[str, Any]) -> None:
        """Open every camera, skip the frames counted in ``resume`` (``positions()`` of a previous run)
        and announce partition 0. A camera that cannot be read is refused by a ``BadVideo`` message."""
        self._committed = _frames_of(resume, [str(p) for p in self.paths])
        self._start(self._committed)
        self._opened = True
        assignment.assigned([0])

    def poll(self, timeout_s: float) -> list[Message]:
        """The frames due now (every frame when ``speed`` is None), at most ``MAX_BATCH`` or what
        ``POLL_DECODE_S`` seconds of decoding give; waits up to ``timeout_s`` seconds when none is due."""
        if not self._heap:
            return []
        if self.speed is not None:
            wait = self._due(self._heap[0][0]) - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, max(timeout_s, 0.0)))
        return self._take(MAX_BATCH)

    @property
    def exhausted(self) -> bool:
        return self._opened and not self._heap

    def positions(self) -> dict[str, Any]:
        return {"frames": {str(c.path): n for c, n in zip(self._cameras, self._emitted, strict=True)}}

    def commit(self) -> None:
        """Nothing to acknowledge; remembers the positions for ``rollback``."""
        self._committed = self.positions()["frames"]

    def rollback(self) -> list[int]:
        """Reopen the cameras at the positions of the last ``commit`` (or of ``open``)."""
        self.close()
        self._start(self._committed)
        return [0]

    def close(self) -> None:
        for c in self._cameras:
            c.close()

    # ---- merging -------------------------------------------------------------------------------------
    def _start(self, skip: Mapping[str, int]) -> None:
        self._cameras = [
            Camera(path, name, self.features, self.fps)
            for path, name in zip(self.paths, self.names, strict=True)
        ]
        self._heap, self._pace = [], None
        for index, camera in enumerate(self._cameras):
            refused = camera.skip(skip.get(str(camera.path), 0))
            self._emitted[index] = camera.frames  # a frame is decoded one ahead of its message: not yet
            if refused is not None:
                heapq.heappush(self._heap, (-math.inf, index, refused))
            else:
                self._push(index)

    def _push(self, index: int) -> None:
        item = self._cameras[index].next()
        if item is not None:
            key = item.time_s if isinstance(item, FrameVector) else -math.inf  # refusals go out at once
            heapq.heappush(self._heap, (key, index, item))

    def _take(self, limit: int) -> list[Message]:
        """Pop up to ``limit`` frames due now as messages, each camera's next frame decoded as one goes."""
        out: list[Message] = []
        now = time.monotonic()
        while self._heap and len(out) < limit and (not out or time.monotonic() - now < POLL_DECODE_S):
            key, index, item = self._heap[0]
            if self.speed is not None and self._due(key) > now:
                break
            heapq.heappop(self._heap)
            camera = self._cameras[index]
            position = item.index if isinstance(item, FrameVector) else self._emitted[index]
            out.append(Message(item, camera.name, 0, position, str(camera.path), now))
            if isinstance(item, FrameVector):
                self._emitted[index] = item.index + 1
                if self._pace is None and self.speed is not None:
                    self._pace = (now, key)
                self._push(index)
        return out

    def _due(self, key: float) -> float:
        """When (monotonic seconds) a frame at ``key`` seconds of video is due at ``speed`` times real pace:
        at once for the first frame and for refusals."""
        if self._pace is None or not math.isfinite(key):
            return -math.inf
        assert self.speed is not None
        wall, anchor = self._pace
        return wall + max(key - anchor, 0.0) / self.speed


def _frames_of(resume: Mapping[str, Any], names: list[str]) -> dict[str, int]:
    """The per-camera frame counts in ``resume`` (``{"frames": {path: count}}``; empty on a first run)."""
    frames = resume.get("frames", {}) if resume else {}
    if not isinstance(frames, Mapping) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in frames.values()
    ):
        raise ValueError(
            f"video source: resume positions must be {{'frames': {{path: count}}}}, got {resume!r}"
        )
    unknown = set(frames) - set(names)
    if unknown:
        log.warning("video source: resume positions name files not replayed now: %s", sorted(unknown))
    return {str(k): v for k, v in frames.items() if k in names}


class VideoDecoder:
    """Turns ``VideoSource`` messages into one-timestep events ``(1, feature_size)``; ``BadVideo`` and
    anything else (a wrong size, NaN) raise ``DecodeError`` (a dead letter with the reason)."""

    def __init__(self, feature_size: int) -> None:
        self.feature_size = feature_size

    @refusing
    def decode(self, message: Message) -> Decoded:
        item = message.payload
        if isinstance(item, BadVideo):
            raise DecodeError(item.reason or "refused video", kind="bad_video")
        if not isinstance(item, FrameVector):
            raise DecodeError(f"not a video frame: {type(item).__name__}")
        x = np.asarray(item.features, dtype=np.float32)
        if x.shape != (self.feature_size,):
            raise DecodeError(f"frame features of shape {x.shape}; the model takes ({self.feature_size},)")
        if not np.isfinite(x).all():
            raise DecodeError("frame features NaN or infinite")
        return Decoded(x[None], stream_id=message.key_text() or "", ts=item.time_s)


def encode_video(
    path: str | Path, frames: np.ndarray, fps: int = 25, codec: str = "mpeg4", bit_rate: int = 4_000_000
) -> Path:
    """Write ``frames (T, H, W, 3) uint8`` RGB as a video file (container from ``path``'s suffix: .mp4,
    .avi, .mkv...) with PyAV at ``bit_rate`` bits a second; ``H`` and ``W`` even (yuv420p). For tests,
    examples and training data."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = bit_rate
        for rgb in frames:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24"))
            )
        container.mux(stream.encode())
    return path
