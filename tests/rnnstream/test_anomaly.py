"""The anomaly detector (``rnnstream.anomaly``) through the real pipeline: causality, determinism, its
parts (surprise, calibration, spatial novelty, refractory period), and its NAB score on the shared
development part of the corpus."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import Message
from rnnstream.config import ServiceConfig
from rnnstream.detect import Variant, nab, pipeline_config, run_files
from rnnstream.service import build_pipeline

SHARED_NAB = Path(__file__).resolve().parents[3] / "shared" / "data" / "nab"
START = datetime(2021, 3, 1, tzinfo=UTC)


def _write(path: Path, values: np.ndarray, step_min: int = 5) -> Path:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["timestamp", "value"])
        for i, v in enumerate(values):
            out.writerow(
                [(START + timedelta(minutes=step_min * i)).strftime("%Y-%m-%d %H:%M:%S"), f"{v:.6f}"]
            )
    return path


def _signal(n: int = 1200, seed: int = 0, spike_at: int | None = 900) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = 50 + 10 * np.sin(np.arange(n) * 2 * np.pi / 96) + rng.normal(0, 0.5, n)
    if spike_at is not None:
        v[spike_at : spike_at + 5] += 40
    return v


def _scores(run) -> np.ndarray:
    return np.array([d["anomaly_score"] for d in run.docs], np.float64)


def _docs(path: Path, tmp: Path, variant: Variant | None = None) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    return run_files([path], tmp, variant or Variant())[path.stem].docs


# ---- causality and determinism ---------------------------------------------------------------------------


class _OneAtATime:
    """Hands the wrapped source's messages to the pipeline one per poll: a live feed, row by row."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self._held: list[Message] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def poll(self, timeout_s: float) -> list[Message]:
        if not self._held:
            self._held = list(self.inner.poll(timeout_s))
        return [self._held.pop(0)] if self._held else []

    def exhausted(self) -> bool:
        return not self._held and self.inner.exhausted()


def test_a_row_by_row_feed_scores_exactly_as_the_file_replay(tmp_path):
    path = _write(tmp_path / "s.csv", _signal(700, spike_at=600))
    replay = _docs(path, tmp_path / "replay")
    work = tmp_path / "live"
    work.mkdir()
    pipeline = build_pipeline(ServiceConfig.model_validate(pipeline_config([path], work)))
    pipeline.source = _OneAtATime(pipeline.source)
    pipeline.run()
    live = [json.loads(line) for line in (work / "scores.jsonl").read_text().splitlines()]
    assert len(live) == len(replay) == 700
    assert pipeline.counters.messages == 700
    for a, b in zip(live, replay, strict=True):
        assert a["anomaly_score"] == b["anomaly_score"] and a["prediction"] == b["prediction"]


def test_the_first_40_percent_score_as_in_the_whole_file(tmp_path):
    values = _signal(1500, spike_at=550)
    whole = _write(tmp_path / "whole.csv", values)
    (tmp_path / "prefix").mkdir()
    prefix = _write(tmp_path / "prefix" / "whole.csv", values[:600])
    a = _docs(whole, tmp_path / "a")
    b = _docs(prefix, tmp_path / "b")
    assert len(b) == 600
    assert [d["anomaly_score"] for d in a[:600]] == [d["anomaly_score"] for d in b]
    assert [d["prediction"] for d in a[:600]] == [d["prediction"] for d in b]
    assert max(d["anomaly_score"] for d in b[540:560]) > 0.25  # the spike is seen without its future


def test_two_runs_give_identical_scores(tmp_path):
    paths = [_write(tmp_path / f"f{k}.csv", _signal(900, seed=k, spike_at=700 + 10 * k)) for k in range(3)]
    runs = [
        run_files(paths, tmp_path / f"run{r}") for r in range(2) if (tmp_path / f"run{r}").mkdir() is None
    ]
    for p in paths:
        assert _scores(runs[0][p.stem]).tolist() == _scores(runs[1][p.stem]).tolist()


# ---- the parts -----------------------------------------------------------------------------------------


def test_a_spike_alerts_once_and_the_refractory_period_holds_back_the_rest(tmp_path):
    path = _write(tmp_path / "spike.csv", _signal(1200, spike_at=900))
    docs = _docs(path, tmp_path / "on")
    alerts = [i for i, d in enumerate(docs) if d["alert"]]
    first = next(i for i in alerts if i >= 900)
    assert first <= 905, alerts
    assert not [i for i in alerts if first < i <= first + 200], alerts
    assert all(d["anomaly_score"] == 0 for d in docs[first + 1 : first + 201])
    off = _docs(path, tmp_path / "off", Variant(refractory=False))
    assert sum(d["alert"] for d in off[900:1100]) > sum(d["alert"] for d in docs[900:1100])


def test_scores_are_probabilities_and_nothing_is_scored_while_learning(tmp_path):
    path = _write(tmp_path / "s.csv", _signal(800, spike_at=None))
    docs = _docs(path, tmp_path / "w")
    scores = np.array([d["anomaly_score"] for d in docs])
    likelihood = np.array([d["likelihood"] for d in docs])
    assert ((scores >= 0) & (scores <= 1)).all() and ((likelihood >= 0) & (likelihood <= 1)).all()
    assert (scores[:300] == 0).all() and not any(d["alert"] for d in docs[:300])
    assert scores[300:].max() < 0.25  # a steady signal raises no alert


def test_a_value_beyond_the_range_seen_is_surprising_even_when_forecast(tmp_path):
    """A slow ramp out of the range seen: each step is small (a good forecast), the level is new."""
    values = _signal(1000, spike_at=None)
    values[700:] += np.linspace(0, 60, 300)
    path = _write(tmp_path / "ramp.csv", values)
    with_spatial = _docs(path, tmp_path / "a")
    assert max(d["likelihood"] for d in with_spatial[700:]) > 0.25


def test_calibration_keeps_noise_quiet_and_a_change_of_regime_loud(tmp_path):
    """On pure noise the raw surprise is often high; the likelihood rarely is (its threshold, 0.25, is a
    one-in-316 event), and it is at its maximum when the variance jumps."""
    rng = np.random.default_rng(3)
    noise = 5 + rng.normal(0, 1, 1200)
    noise[1000:] += rng.normal(0, 6, 200)  # the variance jumps
    path = _write(tmp_path / "noise.csv", noise)
    calibrated = np.array([d["likelihood"] for d in _docs(path, tmp_path / "cal")])
    raw_docs = _docs(path, tmp_path / "raw", Variant(calibration=False, refractory=False))
    raw = np.array([d["likelihood"] for d in raw_docs])
    assert (calibrated[300:1000] >= 0.25).mean() < 0.02
    assert (raw[300:1000] >= 0.25).mean() > 0.2  # without calibration, noise looks anomalous
    assert calibrated[1000:1030].max() > 0.9


# ---- NAB, development part ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_nab():
    labels = SHARED_NAB / "labels" / "combined_windows.json"
    if not labels.exists():
        pytest.fail(f"the shared NAB data is missing: {labels}")
    return SHARED_NAB / "data", labels


@pytest.fixture(scope="module")
def dev_report(dev_nab):
    return nab(*dev_nab)


def test_the_detector_scores_on_the_development_part_of_nab(dev_report):
    report = dev_report
    assert report.files == 25 and report.rows > 129_000
    scores = {name: r.score for name, r in report.profiles.items()}
    # 65.4 / 50.1 / 72.6 measured (README); without calibration, refractory period, records or the weekly
    # comparison: 57.4 / 37.3 / 67.3 and less
    assert scores["standard"] >= 60, scores
    assert scores["reward_low_FP"] >= 44, scores
    assert scores["reward_low_FN"] >= 68, scores


def test_online_adaptation_beats_the_frozen_model_on_nab(dev_nab, dev_report):
    """Measured 65.4 online against 61.0 frozen (standard profile)."""
    online = dev_report.profiles["standard"].score
    frozen = nab(*dev_nab, Variant(online=False)).profiles["standard"].score
    assert online > frozen + 2, (online, frozen)


def _daily_bumps(days: int = 14, missing_day: int | None = 10) -> np.ndarray:
    """5-minute readings: 10 ± noise, with a bump to 30 from 12:00 to 14:00 every day but ``missing_day``."""
    rng = np.random.default_rng(5)
    t = np.arange(days * 288)
    minute_of_day = (t % 288) * 5
    bump = (minute_of_day >= 720) & (minute_of_day < 840)
    if missing_day is not None:
        bump &= t // 288 != missing_day
    return 10 + 20 * bump + rng.normal(0, 0.3, len(t))


def test_the_weekly_comparison_catches_a_missing_daily_event(tmp_path):
    """Day 10's bump does not come: nothing changes from one reading to the next, only against the same
    time a week before (the readings start at midnight)."""
    path = _write(tmp_path / "bumps.csv", _daily_bumps())
    missing = slice(10 * 288 + 144, 10 * 288 + 168)  # 12:00-14:00 of day 10
    weekly = _docs(path, tmp_path / "weekly")
    plain = _docs(path, tmp_path / "plain", Variant(season=False))
    assert any(d["alert"] for d in weekly[missing]), [round(d["likelihood"], 3) for d in weekly[missing]]
    assert not any(d["alert"] for d in plain[missing])


def test_the_weekly_comparison_waits_for_a_week(tmp_path):
    path = _write(tmp_path / "bumps.csv", _daily_bumps(missing_day=None))
    weekly = _docs(path, tmp_path / "weekly")
    plain = _docs(path, tmp_path / "plain", Variant(season=False))
    week = 7 * 288
    assert [d["likelihood"] for d in weekly[:week]] == [d["likelihood"] for d in plain[:week]]


# ---- hostile readings ------------------------------------------------------------------------------------

_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 1e15, -1e15, 1e-300, 5e-324, 1e300]),
    st.integers(-(10**18), 10**18).map(float),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(_values, min_size=1, max_size=400),
    steps=st.lists(st.sampled_from([0.0, 1.0, 300.0, 301.5, 86_400.0, 604_800.0, -5.0, 1e9]), min_size=1),
    start=st.sampled_from([0.0, 1.7e9, -1e9, 3e12]),
)
def test_any_readings_give_scores_in_0_1_and_a_row_each(tmp_path_factory, values, steps, start):
    """Extreme, flat, repeated and out-of-order readings at any spacing: every row comes back, scored in
    [0, 1] or refused with a reason; nothing raises."""
    tmp = tmp_path_factory.mktemp("hostile")
    stamps = start + np.cumsum([steps[i % len(steps)] for i in range(len(values))])
    with open(tmp / "h.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["timestamp", "value"])
        out.writerows([repr(float(t)), repr(v)] for t, v in zip(stamps, values, strict=True))
    run = run_files([tmp / "h.csv"], tmp, Variant(online=False))["h"]
    assert len(run.docs) == len(values)
    for doc, why in zip(run.docs, run.refused, strict=True):
        assert (doc is None) == bool(why)
        if doc is not None:
            assert 0.0 <= doc["anomaly_score"] <= 1.0 and 0.0 <= doc["likelihood"] <= 1.0, doc
