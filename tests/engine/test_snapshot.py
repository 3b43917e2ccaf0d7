"""Snapshots and eviction: stopping in the middle and going on gives the outputs of never stopping."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine import Engine, EngineSnapshot, SnapshotError, UnknownStreamError

ATOL = 1e-5


def _interleaved(ref, rng, streams: int, length: int):
    seqs = {f"s{i}": ref.random_inputs(rng, length) for i in range(streams)}
    ids = [sid for sid in seqs for _ in range(length)]
    rng.shuffle(ids)
    cursor = dict.fromkeys(seqs, 0)
    xs = []
    for sid in ids:
        xs.append(seqs[sid][cursor[sid]])
        cursor[sid] += 1
    return seqs, ids, np.stack(xs)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_snapshot_restore_into_fresh_engine_continues_exactly(ref_factory, tmp_path, kind):
    ref = ref_factory(kind, num_layers=2, hidden_size=9, head_out=2)
    _seqs, ids, xs = _interleaved(ref, np.random.default_rng(0), streams=12, length=20)
    half = len(ids) // 2
    with Engine(ref.model, device="cpu") as uninterrupted:
        expected = uninterrupted.step_many(ids, xs)

    with Engine(ref.model, device="cpu") as first:
        first_half = first.step_many(ids[:half], xs[:half])
        snap = first.snapshot(positions={"input-0": half})
    path = snap.save(tmp_path / "snap.safetensors")

    loaded = EngineSnapshot.load(path)
    assert loaded.positions == {"input-0": half}
    assert sorted(loaded.stream_ids) == sorted(set(ids[:half]))
    with Engine(ref.model, device="cpu") as second:
        second.restore(loaded)
        second_half = second.step_many(ids[half:], xs[half:])
    np.testing.assert_allclose(np.concatenate([first_half, second_half]), expected, atol=ATOL)


def test_snapshot_keeps_int_and_str_ids_apart(ref_factory, tmp_path):
    ref = ref_factory("gru")
    rng = np.random.default_rng(1)
    with Engine(ref.model, device="cpu") as engine:
        engine.step_many([1, "1"], np.stack([ref.random_inputs(rng, 1)[0], ref.random_inputs(rng, 1)[0]]))
        snap = EngineSnapshot.load(engine.snapshot().save(tmp_path / "s.safetensors"))
    assert len(snap.stream_ids) == 2 and 1 in snap.stream_ids and "1" in snap.stream_ids
    with Engine(ref.model, device="cpu") as engine:
        engine.restore(snap)
        assert 1 in engine and "1" in engine
        assert not np.allclose(engine.state_of(1)[0], engine.state_of("1")[0])


def test_restore_refuses_a_snapshot_of_another_model(ref_factory):
    a = ref_factory("gru", hidden_size=8)
    b = ref_factory("gru", hidden_size=5)
    with Engine(a.model, device="cpu") as ea, Engine(b.model, device="cpu") as eb:
        ea.step_many(["x"], a.random_inputs(np.random.default_rng(0), 1))
        with pytest.raises(SnapshotError, match="widths"):
            eb.restore(ea.snapshot())


def test_corrupt_snapshot_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a snapshot at all")
    with pytest.raises(SnapshotError, match="not a readable"):
        EngineSnapshot.load(path)


def test_eviction_with_spill_is_transparent(ref_factory, tmp_path):
    ref = ref_factory("lstm", num_layers=2, hidden_size=7, head_out=1, head_kind="regression")
    _seqs, ids, xs = _interleaved(ref, np.random.default_rng(2), streams=10, length=16)
    half = len(ids) // 2
    with Engine(ref.model, device="cpu") as plain:
        expected = plain.step_many(ids, xs)
    with Engine(ref.model, device="cpu", ttl_s=0.05, eviction="spill", spill_dir=tmp_path) as engine:
        first = engine.step_many(ids[:half], xs[:half])
        time.sleep(0.1)
        evicted = engine.evict_idle()
        assert evicted == len(set(ids[:half]))
        assert engine.active_streams == 0 and engine.stats().spilled_streams == evicted
        # A snapshot taken while streams are spilled still holds them.
        snap = engine.snapshot()
        assert sorted(snap.stream_ids) == sorted(set(ids[:half]))
        second = engine.step_many(ids[half:], xs[half:])
        assert engine.stats().evictions == evicted
    np.testing.assert_allclose(np.concatenate([first, second]), expected, atol=ATOL)
    with Engine(ref.model, device="cpu") as fresh:
        fresh.restore(snap)
        np.testing.assert_allclose(fresh.step_many(ids[half:], xs[half:]), expected[half:], atol=ATOL)


def test_eviction_with_drop_restarts_streams_from_the_initial_state(ref_factory):
    ref = ref_factory("gru", hidden_size=6)
    rng = np.random.default_rng(4)
    seq = ref.random_inputs(rng, 10)
    with Engine(ref.model, device="cpu", ttl_s=0.05, eviction="drop") as engine:
        engine.step_many(["a"] * 5, seq[:5])
        time.sleep(0.1)
        assert engine.evict_idle() == 1
        assert "a" not in engine
        with pytest.raises(UnknownStreamError):
            engine.end("a")
        again = engine.step_many(["a"] * 5, seq[5:])
    np.testing.assert_allclose(again, ref.run(seq[5:]), atol=ATOL)


def test_step_loop_evicts_idle_streams_by_itself(ref_factory):
    ref = ref_factory("rnn_tanh")
    with Engine(ref.model, device="cpu", ttl_s=0.05, sweep_interval_s=0.02) as engine:
        engine.submit("a", ref.random_inputs(np.random.default_rng(0), 1)[0]).result()
        deadline = time.monotonic() + 5
        while "a" in engine and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "a" not in engine and engine.stats().evictions == 1


def test_partial_snapshot_merge_and_release(ref_factory):
    """A subset of streams moves to another engine (as a Kafka partition does) and continues exactly."""
    ref = ref_factory("lstm", num_layers=2, hidden_size=6)
    _seqs, ids, xs = _interleaved(ref, np.random.default_rng(5), streams=8, length=10)
    half = len(ids) // 2
    with Engine(ref.model, device="cpu") as plain:
        expected = plain.step_many(ids, xs)
    moving = ["s0", "s3", "s5"]
    with Engine(ref.model, device="cpu") as a, Engine(ref.model, device="cpu") as b:
        first = a.step_many(ids[:half], xs[:half])
        b.step_many(["other"], xs[:1])
        snap = a.snapshot(stream_ids=[*moving, "never-seen"])
        assert sorted(snap.stream_ids) == moving
        a.release(moving)
        assert all(s not in a for s in moving) and a.active_streams == 5
        b.restore(snap, replace=False)
        assert "other" in b and b.active_streams == 4
        rest = [i for i in range(half, len(ids)) if ids[i] in moving]
        stay = [i for i in range(half, len(ids)) if ids[i] not in moving]
        out_b = b.step_many([ids[i] for i in rest], xs[rest])
        out_a = a.step_many([ids[i] for i in stay], xs[stay])
    np.testing.assert_allclose(first, expected[:half], atol=ATOL)
    np.testing.assert_allclose(out_b, expected[rest], atol=ATOL)
    np.testing.assert_allclose(out_a, expected[stay], atol=ATOL)


# ---- versioned state records: the state layout (cell, layers, widths, dtype) travels with the states -------
def _stepped_snapshot(ref, streams: int = 3, steps: int = 4):
    """A snapshot of ``ref``'s model after ``steps`` random events on each of ``streams`` streams."""
    rng = np.random.default_rng(7)
    ids = [f"s{i}" for i in range(streams)] * steps
    with Engine(ref.model, device="cpu") as engine:
        engine.step_many(ids, np.concatenate([ref.random_inputs(rng, 1) for _ in ids]))
        return engine.snapshot()


@pytest.mark.parametrize(
    ("written", "reading", "message"),
    [
        (("gru", 2, 16), ("lstm", 1, 32), r"state written by gru 2x16 cannot load into lstm 1x32 \(cell"),
        (
            ("gru", 2, 16),
            ("gru", 1, 32),
            r"gru 2x16 cannot load into gru 1x32 \(layers: 2 vs 1; state widths",
        ),
        (
            ("gru", 1, 32),
            ("rnn_tanh", 1, 32),
            r"gru 1x32 cannot load into rnn_tanh 1x32 \(cell: gru vs rnn_tanh\)",
        ),
    ],
)
def test_restore_refusal_says_which_layout_wrote_the_states_and_what_differs(
    ref_factory, tmp_path, written, reading, message
):
    kind, layers, hidden = written
    snap = _stepped_snapshot(ref_factory(kind, num_layers=layers, hidden_size=hidden))
    loaded = EngineSnapshot.load(snap.save(tmp_path / "s.safetensors"))
    kind, layers, hidden = reading
    other = ref_factory(kind, num_layers=layers, hidden_size=hidden)
    with Engine(other.model, device="cpu") as engine:
        for candidate in (snap, loaded):
            with pytest.raises(SnapshotError, match=message):
                engine.restore(candidate)
        assert engine.active_streams == 0


def test_a_snapshot_restores_into_a_model_whose_spec_gained_a_field_with_a_default(ref_factory, tmp_path):
    """A newer release adds a ``ModelSpec`` field with a default: snapshots written before still load."""
    from dataclasses import dataclass

    from models.stream_model import ModelSpec, StreamModel

    @dataclass(frozen=True)
    class NewerSpec(ModelSpec):
        serve_dropout: float = 0.0  # the simulated new field

    ref = ref_factory("lstm", num_layers=2, hidden_size=6, head_out=2)
    _seqs, ids, xs = _interleaved(ref, np.random.default_rng(8), streams=5, length=12)
    half = len(ids) // 2
    with Engine(ref.model, device="cpu") as engine:
        expected = engine.step_many(ids, xs)
    with Engine(ref.model, device="cpu") as engine:
        engine.step_many(ids[:half], xs[:half])
        path = engine.snapshot().save(tmp_path / "old.safetensors")

    newer = StreamModel(NewerSpec.from_dict(ref.model.spec.to_dict()), ref.model.info)
    newer.load_state_dict(ref.model.state_dict())
    assert "serve_dropout" in newer.spec.to_dict()
    with Engine(newer.eval(), device="cpu") as engine:
        engine.restore(EngineSnapshot.load(path))
        np.testing.assert_allclose(engine.step_many(ids[half:], xs[half:]), expected[half:], atol=ATOL)


def test_a_fine_tuned_model_of_the_same_architecture_takes_the_states(ref_factory, tmp_path):
    """New weights (a new model version) are a compatible change: the states load, and the version that
    wrote them is kept in the snapshot."""
    import torch

    from models.stream_model import ModelInfo, StreamModel

    ref = ref_factory("gru", num_layers=2, hidden_size=8)
    path = _stepped_snapshot(ref).save(tmp_path / "v0.safetensors")
    tuned = StreamModel(ref.model.spec, ModelInfo(version=ref.model.info.version + 1))
    tuned.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in ref.model.state_dict().items()})
    loaded = EngineSnapshot.load(path)
    assert loaded.model_version == ref.model.info.version
    with Engine(tuned.eval(), device="cpu") as engine:
        engine.restore(loaded)
        assert engine.active_streams == 3
        np.testing.assert_array_equal(engine.state_of("s1")[1], loaded.state_of("s1")[1])


def test_the_snapshot_header_carries_the_state_layout(ref_factory, tmp_path):
    import json

    from safetensors import safe_open

    from engine.snapshot import state_layout

    ref = ref_factory("lstm", num_layers=2, hidden_size=8, proj_size=3)
    path = _stepped_snapshot(ref).save(tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["state_layout"])
    assert header == {
        "record_version": 1,  # a layout without extras writes what releases before version 2 read
        "cell": "lstm",
        "layers": [[3, 8], [3, 8]],
        "dtype": "float32",
    }
    assert EngineSnapshot.load(path).layout == state_layout(ref.model)
    assert state_layout(ref.model).describe() == "lstm 2x(h 3, c 8)"


def test_snapshots_written_before_versioning_load_and_are_checked_by_their_model_spec(ref_factory, tmp_path):
    """A ``rnnstream.snapshot/1`` file has no layout header: its layout is read from the model spec and
    the state widths it recorded, so it loads into the same model and is refused, saying why, by
    another."""
    import json

    from models.bundle import write_safetensors

    ref = ref_factory("gru", num_layers=2, hidden_size=16)
    snap = _stepped_snapshot(ref)
    meta = {
        "format": "rnnstream.snapshot/1",
        "stream_ids": json.dumps(snap.stream_ids),
        "model_version": "0",
        "model_spec": json.dumps(snap.model_spec),
        "positions": json.dumps({"p": 1}),
        "created_at": repr(snap.created_at),
        "num_states": str(len(snap.states)),
    }
    path = write_safetensors(
        tmp_path / "v1.safetensors", {f"state_{k}": t for k, t in enumerate(snap.states)}, meta
    )
    old = EngineSnapshot.load(path)
    with Engine(ref.model, device="cpu") as engine:
        engine.restore(old)
        np.testing.assert_array_equal(engine.state_of("s2")[1], snap.state_of("s2")[1])
    other = ref_factory("lstm", num_layers=1, hidden_size=16)
    with Engine(other.model, device="cpu") as engine, pytest.raises(SnapshotError, match="gru 2x16"):
        engine.restore(old)
