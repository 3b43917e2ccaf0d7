"""Reading checks (duplicates, order, gaps, flat lines) and the forecast-error anomaly score."""

from __future__ import annotations

import numpy as np
import pytest

from connectors.base import Message
from connectors.codec import Decoded
from engine import Engine
from models import load_bundle
from rnnstream.pipeline import Batch
from rnnstream.sensors import ForecastScoring, ReadingGuard


def _reading(ts: float | None, *values: float, sid: str = "a") -> Decoded:
    return Decoded([list(values)], ts=ts, stream_id=sid)


def test_duplicates_and_out_of_order_readings_are_rejected_per_stream():
    guard = ReadingGuard(channels=1)
    assert guard.check("a", _reading(10.0, 1.0))[0]
    assert guard.check("b", _reading(5.0, 1.0))[0]  # another stream's clock is its own
    ok, notes, _ = guard.check("a", _reading(10.0, 2.0))
    assert not ok and "duplicate" in notes[0]
    ok, notes, _ = guard.check("a", _reading(9.0, 2.0))
    assert not ok and "out of order" in notes[0]
    assert guard.check("a", _reading(11.0, 2.0))[0]
    assert guard.counters()["duplicate"] == 1 and guard.counters()["out_of_order"] == 1


def test_a_gap_is_reported_and_resets_the_state_when_asked():
    keep = ReadingGuard(channels=1, max_gap_s=60)
    reset = ReadingGuard(channels=1, max_gap_s=60, on_gap="reset")
    for guard in (keep, reset):
        guard.check("a", _reading(0.0, 1.0))
        assert guard.check("a", _reading(30.0, 1.5)) == (True, [], False)
    ok, notes, do_reset = keep.check("a", _reading(1000.0, 1.0))
    assert ok and "gap of 970 s" in notes[0] and not do_reset
    ok, notes, do_reset = reset.check("a", _reading(1000.0, 1.0))
    assert ok and "state reset" in notes[0] and do_reset
    assert keep.counters()["gap"] == 1


def test_a_flat_line_is_reported_once_per_run():
    guard = ReadingGuard(channels=2, flatline_after=5)
    notes = [guard.check("a", _reading(float(t), 3.0, 4.0))[1] for t in range(12)]
    assert [t for t, n in enumerate(notes) if n] == [4]
    assert guard.check("a", _reading(12.0, 3.0, 4.1)) == (True, [], False)
    notes = [guard.check("a", _reading(float(t), 3.0, 4.1))[1] for t in range(13, 20)]
    assert sum(bool(n) for n in notes) == 1 and guard.counters()["flatline"] == 2


def test_a_reading_without_timestamp_is_stamped_with_the_arrival_time():
    guard = ReadingGuard(channels=1)
    reading = _reading(None, 1.0)
    assert guard.check("a", reading)[0] and reading.ts is not None and reading.ts > 1.7e9


def _score(scoring: ForecastScoring, model, values: np.ndarray, sid: str = "s") -> list[dict]:
    """Feed one stream's readings, one batch each, through scoring and an engine."""
    docs = []
    with Engine(model, device="cpu", freeze_gc=False) as engine:
        for t, v in enumerate(values):
            batch = Batch()
            batch.add(Message(b""), sid, Decoded([[float(v)]], ts=float(t), stream_id=sid))
            xs = np.array([[v]], np.float32)
            ys = engine.step_many([sid], scoring.inputs([sid], xs))
            docs += scoring.documents(batch, xs, ys, 0)
    return docs


@pytest.fixture(scope="module")
def forecaster():
    from pathlib import Path

    import models

    return load_bundle(Path(models.__file__).parent / "assets" / "sensor_lstm.safetensors").eval()


def test_scores_are_in_unit_range_causal_and_flag_a_spike(forecaster):
    rng = np.random.default_rng(0)
    t = np.arange(600)
    values = (
        500.0 + 40.0 * np.sin(2 * np.pi * t / 50) + rng.normal(0, 1.0, len(t))
    )  # far from the model's units
    spiked = values.copy()
    spiked[400] += 300.0
    norm = forecaster.info.features["normalisation"]
    clean = _score(ForecastScoring(["value"], norm), forecaster, values)
    dirty = _score(ForecastScoring(["value"], norm), forecaster, spiked)
    scores = np.array([d["anomaly_score"] for d in dirty])
    assert ((scores >= 0) & (scores <= 1)).all()
    # causal: everything before the spike is identical
    assert [d["anomaly_score"] for d in clean[:400]] == [d["anomaly_score"] for d in dirty[:400]]
    alerts = [i for i, d in enumerate(dirty) if d["alert"]]
    assert 400 in alerts, alerts
    clean_alerts = [i for i, d in enumerate(clean) if d["alert"]]
    assert len(clean_alerts) <= 3, clean_alerts  # hardly any false alarm on the clean signal
    # the forecast tracks the signal in its own units after warm-up
    err = np.abs([d["prediction"] - d["value"] for d in clean[100:400]])
    assert np.median(err) < 10.0
    assert dirty[401]["alert"] is False  # refractory period


def test_scoring_rows_are_per_stream():
    scoring = ForecastScoring(["value"])
    batch = Batch()
    for sid in ("a", "b", "a"):
        batch.add(Message(b""), sid, Decoded([[1.0]], ts=1.0, stream_id=sid))
    xs = np.array([[1.0], [100.0], [3.0]], np.float32)
    scoring.inputs(batch.ids, xs)
    scoring.documents(batch, xs, np.zeros((3, 1), np.float32), 0)
    rows = scoring.table.export(["a", "b"])
    assert rows[0, 0] == 2 and rows[1, 0] == 1  # readings seen
    assert rows[0, 1] == pytest.approx(2.0) and rows[1, 1] == pytest.approx(100.0)  # running means


def test_more_streams_than_the_tables_first_capacity():
    """Rows grow (and move) when new streams arrive: checks and scores keep working on the moved rows."""
    guard, scoring = ReadingGuard(channels=1), ForecastScoring(["value"])
    ids = [f"s{i}" for i in range(3000)]
    for t in range(2):
        for sid in ids:
            assert guard.check(sid, _reading(float(t), 1.0))[0]
        batch = Batch()
        for sid in ids:
            batch.add(Message(b""), sid, Decoded([[float(t)]], ts=float(t), stream_id=sid))
        xs = np.full((len(ids), 1), float(t))
        scoring.inputs(batch.ids, xs)
        scoring.documents(batch, xs, np.zeros((len(ids), 1), np.float32), 0)
    assert (scoring.table.export(ids)[:, 0] == 2).all()
    assert not guard.check("s2999", _reading(1.0, 1.0))[0]  # its last timestamp was kept
