"""``SimulatedSensors`` and ``simulate_sequences``: deterministic, interleaved, in order per stream, paced."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from connectors.base import DeadLetter, Event, Output, Sink, Source
from connectors.simulated import SimulatedSensors, occurrence_rank, simulate_sequences


def take(source: SimulatedSensors, n: int) -> list[Event]:
    return list(itertools.islice(source, n))


def as_arrays(events: list[Event]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(stream ids, values (n, features), labels, positions) of ``events``."""
    return (
        np.array([e.stream_id for e in events]),
        np.stack([e.x for e in events]),
        np.array([e.label for e in events]),
        np.array([e.position for e in events]),
    )


def test_same_seed_same_events_other_seed_other_events() -> None:
    a = as_arrays(take(SimulatedSensors(50, seed=3, anomaly_prob=0.01), 3000))
    b = as_arrays(take(SimulatedSensors(50, seed=3, anomaly_prob=0.01), 3000))
    c = as_arrays(take(SimulatedSensors(50, seed=4, anomaly_prob=0.01), 3000))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert not np.allclose(a[1], c[1])


def test_events_are_typed_and_numbered() -> None:
    source = SimulatedSensors(10, seed=0, features=3)
    events = take(source, 100)
    assert not isinstance(source, Source)  # an in-process generator for the engine, not a pipeline source
    assert all(isinstance(e.stream_id, int) and 0 <= e.stream_id < 10 for e in events)
    assert all(e.x.shape == (3,) and e.x.dtype == np.float32 for e in events)
    assert [e.position for e in events] == list(range(100))
    assert all(e.control is None and isinstance(e.ts, float) and e.label in (True, False) for e in events)


def test_streams_interleave_randomly() -> None:
    ids, *_ = as_arrays(take(SimulatedSensors(50, seed=1), 2000))
    assert len(set(ids[:300].tolist())) >= 40  # every stream shows up early, not one after another
    switches = np.count_nonzero(ids[1:] != ids[:-1])
    assert switches > 0.9 * (len(ids) - 1)
    counts = np.bincount(ids, minlength=50)
    assert counts.min() > 10 and counts.max() < 90  # about 40 each


def test_each_stream_is_its_own_sine_in_order() -> None:
    """Without spikes, each stream's k-th event is its sine at t = k, within the stream's noise."""
    source = SimulatedSensors(20, seed=2, anomaly_prob=0.0, chunk=500)
    ids, values, _, _ = as_arrays(take(source, 4000))
    p = source.params
    t = occurrence_rank(ids)
    clean = p.offset[ids] + p.amplitude[ids] * np.sin(2 * np.pi * p.freq[ids] * t[:, None] + p.phase[ids])
    z = (values - clean) / p.noise[ids]
    assert np.abs(z).max() < 6
    assert 0.8 < z.std() < 1.2
    np.testing.assert_array_equal(source.steps, np.bincount(ids, minlength=20))
    assert len(set(np.round(p.freq[:, 0], 6))) == 20  # streams differ


def test_spikes_are_labelled_anomalies() -> None:
    source = SimulatedSensors(20, seed=5, anomaly_prob=0.05)
    ids, values, labels, _ = as_arrays(take(source, 4000))
    p = source.params
    t = occurrence_rank(ids)
    clean = p.offset[ids] + p.amplitude[ids] * np.sin(2 * np.pi * p.freq[ids] * t[:, None] + p.phase[ids])
    off = np.abs(values - clean)[:, 0] / p.amplitude[ids][:, 0]
    assert 100 < labels.sum() < 300
    assert off[labels].min() > 0.5  # a spike is at least one amplitude, minus noise
    assert off[~labels].max() < 0.5


def test_rate_paces_the_events() -> None:
    source = SimulatedSensors(5, rate_hz=2000, seed=0)
    started = time.monotonic()
    take(source, 201)
    took = time.monotonic() - started
    assert 0.08 < took < 1.0  # 200 intervals of 0.5 ms


def test_max_events_close_and_commit() -> None:
    source = SimulatedSensors(5, seed=0, max_events=1000, chunk=64)
    assert len(list(source)) == 1000
    assert list(source) == []

    source = SimulatedSensors(5, seed=0)
    it = iter(source)
    next(it)
    source.close()
    assert list(it) == []
    source.commit({SimulatedSensors.PARTITION: 41})
    assert source.committed == {"simulated": 41}


def test_next_batch_matches_events() -> None:
    ids, values, spiked = SimulatedSensors(30, seed=9, anomaly_prob=0.01).next_batch(500)
    events = take(SimulatedSensors(30, seed=9, anomaly_prob=0.01, chunk=500), 500)
    e_ids, e_values, e_labels, _ = as_arrays(events)
    np.testing.assert_array_equal(ids, e_ids)
    np.testing.assert_array_equal(values, e_values)
    np.testing.assert_array_equal(spiked, e_labels)


def test_simulate_sequences() -> None:
    a = simulate_sequences(8, 50, seed=1, features=2, anomaly_prob=0.05)
    b = simulate_sequences(8, 50, seed=1, features=2, anomaly_prob=0.05)
    assert a.values.shape == a.normal.shape == (8, 50, 2) and a.spiked.shape == (8, 50)
    assert a.values.dtype == np.float32
    np.testing.assert_array_equal(a.values, b.values)
    differs = np.any(a.values != a.normal, axis=-1)
    np.testing.assert_array_equal(differs, a.spiked)
    assert a.spiked.any()


def test_base_records() -> None:
    event = Event("s1", np.zeros(2, np.float32))
    with pytest.raises(AttributeError):
        event.stream_id = "s2"  # type: ignore[misc]
    assert Event("s1", None, control="end").is_control
    with pytest.raises(ValueError, match="control"):
        Event("s1", None, control="stop")
    dead = DeadLetter(b"\xff", "not utf-8", position=7)
    assert dead.reason == "not utf-8" and dead.ts > 0

    class ListSink:
        def __init__(self) -> None:
            self.outputs: list[Output] = []

        def write(self, outputs: list[Output]) -> None:
            self.outputs.extend(outputs)

        def flush(self) -> None: ...

        def close(self) -> None: ...

    assert isinstance(ListSink(), Sink)
    assert not isinstance(ListSink(), Source)
