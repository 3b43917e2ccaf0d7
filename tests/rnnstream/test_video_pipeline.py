"""``rnnstream run`` over videos the test writes: the shipped motion detector fires while an object moves and
at a scene cut, not on still frames; a camera whose file is garbage is one dead letter while the others
go on; killed with SIGKILL mid-run and restarted from its checkpoint, every frame's last answer equals a
run without the crash (no frame lost, none applied twice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from connectors.video import encode_video
from rnnstream.cli import app
from rnnstream.video import Script, render
from tests.rnnstream.test_service import Service, jsonl, wait_for

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "assets" / "video_motion_gru.safetensors"

pytestmark = [pytest.mark.integration]

MOVING = Script(100, moving=((20, 45),), cuts=(70,))  # not the scenes of the example or of training
STILL = Script(100)


def _videos(tmp_path: Path) -> dict[str, tuple[Path, Script]]:
    return {
        "door": (encode_video(tmp_path / "door.mp4", render(MOVING, np.random.default_rng(777))), MOVING),
        "hall": (encode_video(tmp_path / "hall.avi", render(STILL, np.random.default_rng(778))), STILL),
    }


def _config(tmp_path: Path, paths: list[Path], name: str, speed: float | None = None) -> Path:
    base = yaml.safe_load((REPO / "configs" / "video-motion.yaml").read_text())
    base["model"] = str(MODEL)
    base["source"]["paths"] = [str(p) for p in paths]
    base["source"]["speed"] = speed
    base["sink"] = {"type": "jsonl", "path": str(tmp_path / f"{name}.jsonl")}
    base["dead_letters"] = {"type": "file", "path": str(tmp_path / f"{name}-dead.jsonl")}
    base["checkpoint"] = {"interval_ms": 100, "dir": str(tmp_path / f"{name}-state")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _p_event(docs: list[dict], stream: str) -> np.ndarray:
    """P(event) per frame of ``stream`` (the last answer for a frame counts)."""
    last = {d["offset"]: d["y"][0][1] for d in docs if d["stream"] == stream}
    assert sorted(last) == list(range(len(last)))
    return np.array([last[k] for k in range(len(last))])


def test_the_detector_fires_while_the_object_moves_and_at_the_cut_not_on_still_frames(tmp_path):
    videos = _videos(tmp_path)
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    config = _config(tmp_path, [videos["door"][0], garbage, videos["hall"][0]], "run")
    svc = Service(config)
    assert svc.wait(120) == 0, svc.log()
    docs = jsonl(tmp_path / "run.jsonl", torn=0)
    dead = jsonl(tmp_path / "run-dead.jsonl", torn=0)
    assert [d["key"] for d in dead] == ["broken"] and "broken.mp4" in dead[0]["reason"]

    door = _p_event(docs, "door")
    events = MOVING.labels().astype(bool)
    assert len(door) == MOVING.length
    moving = np.arange(21, 45)  # the first moving frame may go by: the GRU answers one frame late at most
    assert (door[moving] > 0.5).mean() >= 0.9, door[moving]
    assert door[70] > 0.5  # the cut
    near_event = np.convolve(events, np.ones(7), mode="same") > 0  # within 3 frames of motion or a cut
    assert (door[~near_event] < 0.5).all(), door[~near_event]
    hall = _p_event(docs, "hall")
    assert len(hall) == STILL.length and (hall < 0.5).all()


def test_killed_mid_run_it_restarts_from_its_checkpoint_with_no_frame_lost_or_applied_twice(tmp_path):
    videos = _videos(tmp_path)
    paths = [videos["door"][0], videos["hall"][0]]
    clean = Service(_config(tmp_path, paths, "clean"))
    assert clean.wait(120) == 0, clean.log()
    expected = {(d["stream"], d["offset"]): d["y"] for d in jsonl(tmp_path / "clean.jsonl", torn=0)}
    assert len(expected) == 200

    config = _config(tmp_path, paths, "crashed", speed=1.0)  # 4 s of video: killed part way
    out = tmp_path / "crashed.jsonl"
    svc = Service(config)
    wait_for(lambda: len(jsonl(out)) > 60, 60, "the first outputs", svc)
    svc.kill()
    done_before = len(jsonl(out))
    assert done_before < 200
    svc = Service(_config(tmp_path, paths, "crashed", speed=None))
    assert svc.wait(120) == 0, svc.log()
    docs = jsonl(out)
    assert len(docs) < done_before + 200  # resumed from its checkpoint's frames, not from the start
    last = {(d["stream"], d["offset"]): d["y"] for d in docs}  # a replayed frame answers again
    assert set(last) == set(expected)
    for key, y in expected.items():
        np.testing.assert_allclose(last[key], y, atol=1e-5, err_msg=str(key))


def test_check_refuses_frame_features_that_do_not_fit_the_model(tmp_path):
    config = _config(tmp_path, [_videos(tmp_path)["door"][0]], "wrong")
    doc = yaml.safe_load(config.read_text())
    doc["source"]["rows"] = 10  # 10×16 differences: 160 features for a model of 192
    config.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["check", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "160 features" in result.output, result.output
