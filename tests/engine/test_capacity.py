"""Capacity: paged state, stream and memory limits with eviction or refusal, memory coming back, and the
spill store as a cache of this process's live state (never a source of truth across a restart)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
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


# ---- limits ----------------------------------------------------------------------------------------------
def _interleaved(n_streams: int, length: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = [f"s{k}" for k in rng.permutation(np.repeat(np.arange(n_streams), length))]
    return ids, rng.standard_normal((len(ids), 3)).astype(np.float32)


def test_max_streams_with_spill_is_transparent_and_counted(tmp_path):
    """Ten streams through an engine that holds at most four: the least recently used go to disk and come
    back on their next event; every output equals the unlimited engine's."""
    ids, xs = _interleaved(10, 12, seed=2)
    with Engine(_gru(), device="cpu") as plain:
        expected = np.concatenate(
            [plain.step_many(ids[i : i + 3], xs[i : i + 3]) for i in range(0, len(ids), 3)]
        )
    with Engine(_gru(), device="cpu", max_streams=4, eviction="spill", spill_dir=tmp_path) as engine:
        got = np.concatenate([engine.step_many(ids[i : i + 3], xs[i : i + 3]) for i in range(0, len(ids), 3)])
        stats = engine.stats()
    np.testing.assert_allclose(got, expected, atol=ATOL)
    assert stats.active_streams <= 4 and stats.evictions_for_capacity > 0 and stats.refused_streams == 0
    assert stats.evictions >= stats.evictions_for_capacity


def test_new_streams_past_the_limit_with_nothing_evictable_are_refused_and_change_nothing():
    from engine import StreamCapacityError

    xs = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    with Engine(_gru(), device="cpu", max_streams=2) as engine:
        try:
            engine.step_many(["a", "b", "c", "a"], xs)
            raise AssertionError("a third stream in one call must be refused")
        except StreamCapacityError as exc:
            assert exc.stream_ids == ["c"] and exc.indices == [2]
        assert (
            engine.active_streams == 0 and engine.stats().events == 0 and engine.stats().refused_streams == 1
        )
        with Engine(_gru(), device="cpu") as plain:
            want = plain.step_many(["a", "b", "a"], xs[[0, 1, 3]])
        np.testing.assert_allclose(engine.step_many(["a", "b", "a"], xs[[0, 1, 3]]), want, atol=ATOL)


def test_queued_events_of_a_refused_stream_fail_and_the_others_run():
    from engine import StreamCapacityError

    xs = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)
    with Engine(_gru(), device="cpu", max_streams=2, max_delay_ms=300) as engine:
        futures = [engine.submit(s, x) for s, x in zip(["a", "b", "c", "a"], xs, strict=True)]
        assert isinstance(futures[2].exception(timeout=10), StreamCapacityError)
        with Engine(_gru(), device="cpu") as plain:
            want = plain.step_many(["a", "b", "a"], xs[[0, 1, 3]])
        got = np.stack([futures[i].result(timeout=10) for i in (0, 1, 3)])
        np.testing.assert_allclose(got, want, atol=ATOL)
        stats = engine.stats()
        assert stats.events == 3 and stats.refused_streams == 1 and stats.errors == 0
        engine.submit("d", xs[0]).result(timeout=10)  # a later batch: the least recently used one goes
        assert engine.active_streams == 2 and engine.stats().evictions_for_capacity == 1


def test_state_memory_stays_within_the_budget_and_comes_back_after_eviction():
    with Engine(_gru(), device="cpu", capacity=1024) as probe:
        row = probe._store.row_bytes()
    budget = 50_000 * row
    with Engine(_gru(), device="cpu", max_state_bytes=budget, ttl_s=3600) as engine:
        rng = np.random.default_rng(5)
        for start in range(0, 60_000, 4096):
            ids = np.arange(start, min(start + 4096, 60_000))
            engine.step_many(ids, rng.standard_normal((len(ids), 3)).astype(np.float32))
            assert engine.stats().state_bytes <= budget
        stats = engine.stats()
        assert stats.active_streams == 50_000 and stats.evictions_for_capacity == 10_000
        held = stats.state_bytes
        engine.release(list(range(10_000, 60_000)))
        assert engine.stats().state_bytes < held / 2  # pages were freed
        assert engine.stats().capacity < 50_000


def test_the_service_config_limits_reach_the_engine():
    """``engine.max_streams`` / ``engine.max_state_bytes`` in a service config become the Engine's limits."""
    import pytest

    from rnnstream.config import ConfigError, load_config
    from rnnstream.service import _engine

    overrides = {"engine.max_streams": 2, "engine.max_state_bytes": 1 << 20, "engine.device": "cpu"}
    engine = _engine(load_config(ROOT / "configs" / "sensors-csv.yaml", overrides))
    try:
        store = engine._store
        assert (store.max_streams, store.max_bytes) == (2, 1 << 20)
    finally:
        engine.close()
    with pytest.raises(ConfigError, match="max_streams"):
        load_config(ROOT / "configs" / "sensors-csv.yaml", {"engine.max_streams": 0})


def test_outputs_across_pages_equal_the_torch_module(ref_factory):
    """Streams spread over many small pages (4 rows), stepped in random batches through ``step_many`` and
    ``submit`` while others end and free pages (moving streams between pages): every output equals the
    torch module run over the stream's whole sequence."""
    ref = ref_factory("lstm", input_size=3, hidden_size=5, num_layers=2, head_out=2)
    rng = np.random.default_rng(8)
    seqs = {f"s{k}": ref.random_inputs(rng, 24) for k in range(30)}
    outs: dict[str, list] = {sid: [] for sid in seqs}
    with Engine(ref.model, device="cpu", capacity=1, page_rows=4, max_batch=16) as engine:
        for t in range(0, 24, 2):
            live = [s for s in seqs if t < 12 or int(s[1:]) % 3 == 0]  # two thirds end at t = 12
            if t == 12:
                for sid in set(seqs) - set(live):
                    engine.end(sid)
            ids = [s for s in live for _ in range(2)]
            order = rng.permutation(len(ids))
            ids = [ids[i] for i in order]
            cursor = dict.fromkeys(live, t)
            xs = []
            for sid in ids:
                xs.append(seqs[sid][cursor[sid]])
                cursor[sid] += 1
            half = len(ids) // 2
            ys = list(engine.step_many(ids[:half], np.stack(xs[:half])))
            ys += [
                f.result(timeout=10)
                for f in [engine.submit(s, x) for s, x in zip(ids[half:], xs[half:], strict=True)]
            ]
            for sid, y in zip(ids, ys, strict=True):
                outs[sid].append(y)
        assert len(engine._store.pages) <= 3  # 10 streams left: pages were freed
    for sid, seq in seqs.items():
        n = len(outs[sid])
        np.testing.assert_allclose(np.stack(outs[sid]), ref.run(seq[:n]), atol=ATOL, err_msg=sid)


def test_admit_refuses_what_does_not_fit_before_any_state_changes_and_admits_the_rest():
    engine = Engine(_gru(), device="cpu", freeze_gc=False, max_streams=3)
    xs = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32)
    engine.step_many(["a"], xs[:1])
    before = engine.state_of("a")[0].clone()
    refused = engine.admit(["a", "b", "c", "d", "b"])  # "a" is in this call: not evictable
    assert refused == ["d"] and "d" not in engine
    assert "b" in engine and "c" in engine
    assert torch.equal(engine.state_of("a")[0], before)
    assert engine.stats().refused_streams == 1
    # admitted streams start from the initial state: stepping them now equals stepping them fresh
    fresh = Engine(_gru(), device="cpu", freeze_gc=False)
    np.testing.assert_allclose(engine.step_many(["b"], xs[1:2]), fresh.step_many(["b"], xs[1:2]), atol=ATOL)
    engine.close()
    fresh.close()


def test_streams_dropped_by_eviction_are_reported_once_to_a_watcher():
    engine = Engine(_gru(), device="cpu", freeze_gc=False, ttl_s=0.05, max_streams=2, sweep_interval_s=60)
    xs = np.ones((1, 3), np.float32)
    engine.step_many(["x"], xs)
    time.sleep(0.1)
    assert engine.evict_idle() == 1
    assert engine.take_dropped() == []  # dropped before anyone watched
    engine.watch_drops()
    for sid in "abc":  # "c" is past max_streams: the least recently used ("a") is dropped for it
        engine.step_many([sid], xs)
    assert engine.take_dropped() == ["a"]
    time.sleep(0.1)
    assert engine.evict_idle() == 2
    assert sorted(engine.take_dropped()) == ["b", "c"]
    assert engine.take_dropped() == []
    engine.close()
