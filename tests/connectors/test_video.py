"""``connectors.video``: frame features against independent computations, the source's replay from
positions, its merge and pace, refusals of hostile files (fixed cases and hypothesis-mutated files), and
engine outputs over the features equal to the torch module over each camera's whole sequence."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.codec import DecodeError
from connectors.video import (
    BadVideo,
    Camera,
    FrameFeatures,
    FrameVector,
    VideoDecoder,
    VideoSource,
    VideoUnusable,
    _checked,
    encode_video,
)
from engine import Engine
from rnnstream.video import Script, render


class _Assigned:
    def __init__(self) -> None:
        self.partitions: list[int] = []

    def assigned(self, partitions: list[int]) -> None:
        self.partitions += partitions

    def revoked(self, partitions: list[int]) -> None: ...

    def lost(self, partitions: list[int]) -> None: ...


def _scene(path: Path, seed: int, length: int = 24, fps: int = 25) -> Path:
    script = Script(length, moving=((length // 3, 2 * length // 3),), cuts=(length - 4,))
    return encode_video(path, render(script, np.random.default_rng(seed)), fps=fps)


def _drain(source: VideoSource, limit: int | None = None) -> list:
    """``(key, position, payload)`` of the messages ``source`` gives (at most ``limit``)."""
    out: list = []
    while not source.exhausted and (limit is None or len(out) < limit):
        out += [(m.key, m.position, m.payload) for m in source.poll(0.1)]
    return out if limit is None else out[:limit]


def _all_frames(camera: Camera) -> tuple[list[FrameVector], FrameVector | BadVideo | None]:
    frames = []
    while isinstance(item := camera.next(), FrameVector):
        frames.append(item)
    return frames, item


# ---- features -------------------------------------------------------------------------------------------
def test_grey_features_are_the_decoded_luma_block_averaged_over_the_grid(tmp_path):
    path = _scene(tmp_path / "a.mp4", seed=1)  # 64×96 frames: 8×12 blocks of 8×8 pixels
    settings_ = FrameFeatures(("grey",), rows=8, cols=12)
    frames, end = _all_frames(Camera(path, "a", settings_, 25.0))
    assert end is None and len(frames) == 24
    with av.open(str(path)) as container:
        for frame, got in zip(container.decode(video=0), frames, strict=True):
            luma = frame.to_ndarray(format="gray").astype(np.float64) / 255
            expected = luma.reshape(8, 8, 12, 8).mean(axis=(1, 3)).ravel()
            assert got.features.shape == (96,) and got.features.dtype == np.float32
            np.testing.assert_allclose(got.features, expected, atol=1.5 / 255)


def test_difference_is_zero_first_then_the_change_of_the_grey_grid(tmp_path):
    path = _scene(tmp_path / "a.mp4", seed=2)
    grey = [f.features for f in _all_frames(Camera(path, "a", FrameFeatures(("grey",)), 25.0))[0]]
    both = _all_frames(Camera(path, "a", FrameFeatures(("difference", "grey")), 25.0))[0]
    n = 12 * 16
    np.testing.assert_array_equal(both[0].features[:n], 0.0)
    for t in range(1, len(grey)):
        np.testing.assert_array_equal(both[t].features[n:], grey[t])
        np.testing.assert_allclose(both[t].features[:n], np.abs(grey[t] - grey[t - 1]), atol=1e-7)
    still = [t for t in range(1, 8)]  # the object stands still before frame 8
    assert max(both[t].features[:n].max() for t in still) < 0.02
    assert both[-4].features[:n].mean() > 0.05  # the cut


def test_histogram_counts_fractions_of_pixels_per_colour_bin(tmp_path):
    frame = np.zeros((1, 64, 96, 3), np.uint8)
    frame[..., :48, 0] = 255  # left half red, right half black
    path = encode_video(tmp_path / "h.mp4", frame)
    (got,), _ = _all_frames(Camera(path, "h", FrameFeatures(("histogram",), bins=4), 25.0))
    r, g, b = got.features.reshape(3, 4)
    np.testing.assert_allclose([r.sum(), g.sum(), b.sum()], 1.0, atol=1e-6)
    assert abs(r[3] - 0.5) < 0.05 and abs(r[0] - 0.5) < 0.05  # red: half full, half none
    assert g[0] > 0.95 and b[0] > 0.95


def test_image_directory_frames_carry_the_images_own_grey_values(tmp_path):
    images = tmp_path / "cam"
    images.mkdir()
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (5, 4, 6), dtype=np.uint8)
    for k, picture in enumerate(pictures):  # PGM: binary grey images FFmpeg reads
        (images / f"{k:03d}.pgm").write_bytes(b"P5 6 4 255\n" + picture.tobytes())
    frames, end = _all_frames(Camera(images, "cam", FrameFeatures(("grey",), rows=4, cols=6), fps=10.0))
    assert end is None
    np.testing.assert_allclose([f.features for f in frames], pictures.reshape(5, -1) / 255, atol=1e-6)
    assert [f.time_s for f in frames] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])


# ---- the source -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cameras(tmp_path_factory) -> list[Path]:
    """Three cameras at 25, 10 and 25 frames a second."""
    root = tmp_path_factory.mktemp("cams")
    return [
        _scene(root / "c0.mp4", 0),
        _scene(root / "c1.avi", 1, 12, fps=10),
        _scene(root / "c2.mkv", 2, 30),
    ]


def test_cameras_merge_in_frame_time_order_each_in_its_own_order(cameras):
    source = VideoSource(cameras)
    assignment = _Assigned()
    source.open(assignment, {})
    got = _drain(source)
    assert assignment.partitions == [0]
    assert sorted({k for k, _, _ in got}) == ["c0", "c1", "c2"]
    times = [p.time_s for _, _, p in got]
    assert times == sorted(times)
    for name, length in (("c0", 24), ("c1", 12), ("c2", 30)):
        assert [pos for k, pos, _ in got if k == name] == list(range(length))
    assert source.positions() == {"frames": {str(p): n for p, n in zip(cameras, (24, 12, 30), strict=True)}}


@pytest.mark.parametrize("taken", [0, 1, 17, 40, 66])
def test_a_restart_from_positions_gives_exactly_the_frames_after_them(cameras, taken):
    full = VideoSource(cameras)
    full.open(_Assigned(), {})
    everything = _drain(full)
    counts = {str(p): sum(k == p.stem for k, _, _ in everything[:taken]) for p in cameras}
    resumed = VideoSource(cameras)
    resumed.open(_Assigned(), {"frames": counts})
    rest = _drain(resumed)
    assert [(k, p) for k, p, _ in rest] == [(k, p) for k, p, _ in everything[taken:]]
    for (_, _, a), (_, _, b) in zip(rest, everything[taken:], strict=True):
        np.testing.assert_array_equal(a.features, b.features)


def test_positions_after_a_paced_poll_resume_exactly_after_what_it_returned(cameras):
    full = VideoSource(cameras)
    full.open(_Assigned(), {})
    everything = [(k, p) for k, p, _ in _drain(full)]
    paced = VideoSource(cameras, speed=4.0)  # a poll returns only the frames due so far
    paced.open(_Assigned(), {})
    first = [(m.key, m.position) for m in paced.poll(0.05)]
    first += [(m.key, m.position) for m in paced.poll(0.05)]
    assert 0 < len(first) < len(everything)
    resumed = VideoSource(cameras)
    resumed.open(_Assigned(), paced.positions())
    assert first + [(k, p) for k, p, _ in _drain(resumed)] == everything


def test_a_poll_decodes_for_a_bounded_time_and_the_next_one_goes_on(cameras, monkeypatch):
    monkeypatch.setattr("connectors.video.POLL_DECODE_S", 0.0)  # as if every frame took the whole budget
    source = VideoSource(cameras)
    source.open(_Assigned(), {})
    polls = []
    while not source.exhausted:
        polls.append([(m.key, m.position) for m in source.poll(0.1)])
    assert all(len(p) == 1 for p in polls) and len(polls) == 24 + 12 + 30


def test_rollback_goes_back_to_the_last_commit(cameras):
    source = VideoSource(cameras[:1])
    source.open(_Assigned(), {})
    whole = _drain(source)
    source.rollback()
    assert [(k, p) for k, p, _ in _drain(source)] == [(k, p) for k, p, _ in whole]
    source.commit()
    source.rollback()
    assert _drain(source) == [] and source.exhausted


def test_real_pace_takes_the_videos_duration_and_unpaced_does_not(tmp_path):
    path = _scene(tmp_path / "p.mp4", 0, length=10)  # 10 frames at 25 fps: the last at 0.36 s
    for speed, at_least, at_most in ((1.0, 0.33, 2.0), (None, 0.0, 0.3)):
        source = VideoSource([path], speed=speed)
        source.open(_Assigned(), {})
        started = time.monotonic()
        assert len(_drain(source)) == 10
        took = time.monotonic() - started
        assert at_least <= took <= at_most, (speed, took)


# ---- refusals -------------------------------------------------------------------------------------------
def _refusal(path: Path) -> str:
    frames, end = _all_frames(Camera(path, path.stem, FrameFeatures(), 25.0))
    assert isinstance(end, BadVideo), (frames, end)
    return end.reason


def test_hostile_files_are_refused_with_a_reason(tmp_path):
    good = _scene(tmp_path / "good.mkv", 0, length=50)
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "empty.avi").write_bytes(b"")
    (tmp_path / "cut.mkv").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "noimages").mkdir()
    (tmp_path / "badimage").mkdir()
    (tmp_path / "badimage" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert "Invalid data" in _refusal(tmp_path / "garbage.mp4")
    assert _refusal(tmp_path / "empty.avi")
    assert "truncated" in _refusal(tmp_path / "cut.mkv")
    assert "no image" in _refusal(tmp_path / "noimages")
    assert "0.png" in _refusal(tmp_path / "badimage")
    assert "No such file" in _refusal(tmp_path / "missing.mp4")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "0.pgm").write_bytes(b"P5 0 0 255\n")  # a 0×0 picture
    assert "0.pgm" in _refusal(tmp_path / "zero")
    with pytest.raises(VideoUnusable, match="0×0"):
        _checked(av.VideoFrame(0, 0, "rgb24"))  # a zero-size frame a decoder might hand over


def test_a_video_with_a_longer_audio_track_is_not_taken_for_a_truncated_one(tmp_path):
    path = tmp_path / "talk.mkv"
    with av.open(str(path), "w") as container:  # 10 frames of video (0.4 s), 2 s of audio
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 96, 64, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        for t in range(10):
            picture = np.full((64, 96, 3), t * 20, np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(video.encode())
        for k in range(20):
            block = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            block.rate, block.pts = 8000, k * 800
            container.mux(audio.encode(block))
        container.mux(audio.encode())
    frames, end = _all_frames(Camera(path, "talk", FrameFeatures(), 25.0))
    assert len(frames) == 10 and end is None, end


def test_a_refused_camera_is_one_dead_letter_and_the_others_go_on(cameras, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    source = VideoSource([cameras[0], garbage, cameras[1]])
    source.open(_Assigned(), {})
    got = _drain(source)
    decoder = VideoDecoder(FrameFeatures().size)
    refused = [(k, p) for k, _, p in got if isinstance(p, BadVideo)]
    assert [k for k, _ in refused] == ["garbage"]
    with pytest.raises(DecodeError, match="Invalid data"):
        decoder.decode(next(m for m in _messages([cameras[0], garbage]) if isinstance(m.payload, BadVideo)))
    assert sum(isinstance(p, FrameVector) for _, _, p in got) == 24 + 12


def _messages(paths: list[Path]) -> list:
    source = VideoSource(paths)
    source.open(_Assigned(), {})
    out = []
    while not source.exhausted:
        out += source.poll(0.1)
    return out


def test_the_decoder_refuses_wrong_sizes_and_non_finite_features(cameras):
    message = _messages(cameras[:1])[0]
    assert VideoDecoder(192).decode(message).xs.shape == (1, 192)
    with pytest.raises(DecodeError, match="shape"):
        VideoDecoder(10).decode(message)
    message.payload = FrameVector(np.full(192, np.nan, np.float32), 0.0, 0)
    with pytest.raises(DecodeError, match="NaN"):
        VideoDecoder(192).decode(message)
    message.payload = b"\0\1"
    with pytest.raises(DecodeError, match="not a video frame"):
        VideoDecoder(192).decode(message)


@pytest.fixture(scope="module")
def small_videos(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("small")
    return {
        suffix: _scene(root / f"s{suffix}", 3, length=8).read_bytes() for suffix in (".mp4", ".avi", ".mkv")
    }


@st.composite
def mutations(draw):
    suffix = draw(st.sampled_from([".mp4", ".avi", ".mkv"]))
    edits = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["flip", "cut", "insert", "zero"]),
                st.floats(0, 1),
                st.binary(min_size=1, max_size=64),
            ),
            min_size=1,
            max_size=4,
        )
    )
    return suffix, edits


def _mutated(data: bytes, edits: list) -> bytes:
    for kind, where, blob in edits:
        at = int(where * len(data))
        if kind == "flip":
            data = data[:at] + bytes(b ^ 0xFF for b in blob) + data[at + len(blob) :]
        elif kind == "cut":
            data = data[:at]
        elif kind == "insert":
            data = data[:at] + blob + data[at:]
        else:
            data = data[:at] + b"\0" * len(blob) + data[at + len(blob) :]
    return data


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(mutations())
def test_mutated_video_files_give_frames_or_a_refusal_never_an_exception(
    small_videos, tmp_path_factory, case
):
    suffix, edits = case
    path = tmp_path_factory.mktemp("mut") / f"m{suffix}"
    path.write_bytes(_mutated(small_videos[suffix], edits))
    settings_ = FrameFeatures(("grey", "difference", "histogram"))
    camera = Camera(path, "m", settings_, 25.0)
    for _ in range(1000):  # a mutated header may claim anything: the camera must still end
        item = camera.next()
        if item is None or isinstance(item, BadVideo):
            break
        assert item.features.shape == (settings_.size,) and np.isfinite(item.features).all()
        assert ((item.features >= 0) & (item.features <= 1)).all()
    else:
        pytest.fail("a mutated 8-frame file gave 1000 frames")
    assert camera.next() is None  # done after its end or its refusal


# ---- equivalence ----------------------------------------------------------------------------------------
EQ_SETTINGS = FrameFeatures(("grey", "difference", "histogram"), rows=4, cols=6, bins=4)


@pytest.fixture(scope="module")
def camera_features(cameras) -> list[np.ndarray]:
    return [
        np.stack([f.features for f in _all_frames(Camera(p, p.stem, EQ_SETTINGS, 25.0))[0]]) for p in cameras
    ]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    order_seed=st.integers(0, 2**16),
    cuts=st.sets(st.integers(1, 65), max_size=6),
    kind=st.sampled_from(["gru", "lstm"]),
)
def test_streamed_frame_features_equal_the_torch_module_over_each_whole_camera(
    ref_factory, camera_features, order_seed, cuts, kind
):
    ref = ref_factory(
        kind, input_size=EQ_SETTINGS.size, hidden_size=8, num_layers=2, head_out=2, head_kind="classifier"
    )
    expected = [ref.run(seq) for seq in camera_features]
    rng = np.random.default_rng(order_seed)
    order = rng.permutation([c for c, seq in enumerate(camera_features) for _ in range(len(seq))])
    cursor = [0] * len(camera_features)
    events = []
    for c in order:
        events.append((c, cursor[c]))
        cursor[c] += 1
    got = [np.full_like(e, np.nan) for e in expected]
    with Engine(ref.model, device="cpu", max_batch=4, capacity=2) as engine:
        for lo, hi in itertools.pairwise([0, *sorted(c for c in cuts if c < len(events)), len(events)]):
            chunk = events[lo:hi]
            outs = engine.step_many(
                [f"cam{c}" for c, _ in chunk], np.stack([camera_features[c][t] for c, t in chunk])
            )
            for (c, t), out in zip(chunk, outs, strict=True):
                got[c][t] = out
    for c in range(len(camera_features)):
        np.testing.assert_allclose(got[c], expected[c], atol=1e-5, rtol=1e-5, err_msg=f"camera {c}")
