"""Capacity: paged state, stream and memory limits with eviction or refusal, memory coming back, and the
spill store as a cache of this process's live state (never a source of truth across a restart)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from engine import Engine, EngineSnapshot
from models.stream_model import ModelSpec, StreamModel

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[2]


def _gru(seed: int = 0) -> StreamModel:
    torch.manual_seed(seed)
    return StreamModel(ModelSpec("gru", 3, 8)).eval()


CRASHING_RUN = """
import os, sys
import numpy as np, torch
from engine import Engine
from models.stream_model import ModelSpec, StreamModel

spill_dir, snap_path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = StreamModel(ModelSpec("gru", 3, 8)).eval()
xs = np.load(sys.argv[3])
engine = Engine(model, device="cpu", ttl_s=0.01, eviction="spill", spill_dir=spill_dir)
engine.step_many(["old"] * 3, xs[:3])
engine.snapshot().save(snap_path)  # the checkpoint
engine.step_many(["old"] * 2 + ["late"] * 2, xs[3:7])  # after the checkpoint: not committed
import time; time.sleep(0.05)
assert engine.evict_idle() == 2 and engine.stats().spilled_streams == 2
os._exit(0)  # a crash: nothing is closed or cleaned up
"""


def test_a_restart_resumes_from_the_checkpoint_not_from_what_was_spilled_after_it(tmp_path):
    """A process spills streams after its last checkpoint and dies; the next process on the same
    ``spill_dir`` restores the checkpoint: "old" resumes from the checkpoint's state and "late" (born
    after it) from the initial state, so replaying the events since the checkpoint gives the same outputs
    as the first time. Before, the spilled rows were reloaded and took precedence."""
    xs = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    np.save(tmp_path / "xs.npy", xs)
    spill_dir, snap_path = tmp_path / "spill", tmp_path / "checkpoint.safetensors"
    subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CRASHING_RUN),
            str(spill_dir),
            str(snap_path),
            str(tmp_path / "xs.npy"),
        ],
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    with Engine(_gru(), device="cpu") as plain:
        expected = plain.step_many(["old"] * 5 + ["late"] * 2, xs)
    with Engine(_gru(), device="cpu", ttl_s=60, eviction="spill", spill_dir=spill_dir) as engine:
        assert engine.stats().spilled_streams == 0 and "late" not in engine
        engine.restore(EngineSnapshot.load(snap_path), replace=False)
        replayed = engine.step_many(["old"] * 2 + ["late"] * 2, xs[3:7])
        assert len(list(spill_dir.iterdir())) >= 1
    np.testing.assert_allclose(replayed, expected[3:], atol=ATOL)
    assert not [p for p in spill_dir.iterdir() if p.suffix == ".sqlite"], (
        "a closed engine leaves no spill file"
    )


def test_snapshot_holds_streams_spilled_after_it_was_last_taken(tmp_path):
    xs = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    with Engine(_gru(), device="cpu", ttl_s=0.01, eviction="spill", spill_dir=tmp_path) as engine:
        engine.step_many(["a", "b", "a", "b"], xs)
        import time

        time.sleep(0.03)
        engine.step_many(["b"], xs[:1])
        assert engine.evict_idle() == 1 and "a" in engine and engine.active_streams == 1
        snap = engine.snapshot()
    assert sorted(snap.stream_ids) == ["a", "b"]
    with Engine(_gru(), device="cpu") as plain:
        want = plain.step_many(["a", "b", "a", "b", "b"], np.concatenate([xs, xs[:1]]))
    with Engine(_gru(), device="cpu") as fresh:
        fresh.restore(snap)
        np.testing.assert_allclose(fresh.state_of("a")[0].numpy(), want[2], atol=ATOL)
        np.testing.assert_allclose(fresh.state_of("b")[0].numpy(), want[4], atol=ATOL)
