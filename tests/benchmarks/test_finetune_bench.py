"""The fine-tuning benchmark's demo measurement (``rnnstream demo`` without and with ``--finetune``): the
ratio, checks and table marks follow the targets, on both sides of each. Stand-in demo runs: speed is the
benchmark's to measure."""

from __future__ import annotations

import math

import pytest

from benchmarks import finetune_bench as fb
from rnnstream.demo import DemoSummary
from tests.benchmarks.tables import table_rows


def _summary(events_per_s: float, finetune: bool, first_update: float, first_version: float) -> DemoSummary:
    return DemoSummary(
        events=int(events_per_s * 10),
        seconds=10.0,
        events_per_s=events_per_s,
        latency_p50_ms=2.0,
        latency_p99_ms=9.0 if finetune else 7.5,
        mean_abs_error=0.07,
        anomalies=10,
        finetune=finetune,
        finetune_updates=250 if finetune else 0,
        finetune_versions=4 if finetune else 0,
        first_update_s=first_update,
        first_version_s=first_version,
    )


@pytest.mark.parametrize(
    ("with_rate", "first_update", "first_version", "marks"),
    [
        (40_000.0, 5.0, 15.0, ("80% ✓", "5.0 s ✓", "15.0 s ✓")),
        (39_900.0, 5.1, 15.1, ("80% ✗", "5.1 s ✗", "15.1 s ✗")),  # 79.75%: under 80%
        (45_000.0, math.nan, math.nan, ("90% ✓", "none ✗", "none ✗")),
    ],
    ids=["at-the-targets", "just-past", "never"],
)
def test_demo_row_judges_throughput_first_update_and_first_version(
    monkeypatch, with_rate, first_update, first_version, marks
):
    calls: list[dict] = []

    def run_demo(**kwargs) -> DemoSummary:
        calls.append(kwargs)
        if kwargs["finetune"]:
            return _summary(with_rate, True, first_update, first_version)
        return _summary(50_000.0, False, math.nan, math.nan)

    monkeypatch.setattr("rnnstream.demo.run_demo", run_demo)
    demo = fb.demo_run(10.0)
    assert [(c["num_streams"], c["seconds"], c["finetune"]) for c in calls] == [
        (1000, 10.0, False),
        (1000, 10.0, True),
    ]
    ok = marks[0].endswith("✓"), marks[1].endswith("✓"), marks[2].endswith("✓")
    assert demo["checks"] == dict(zip(("throughput", "first_update", "first_version"), ok, strict=True))
    assert demo["throughput_ratio"] == with_rate / 50_000.0
    (row,) = table_rows(fb.demo_table(demo))
    assert (row["with / without"], row["first update"], row["first version"]) == marks
    assert row["ev/s without"] == "50,000" and row["p99 with"] == "9.0 ms" and row["versions"] == "4"


def test_the_demo_table_comes_with_the_demo_measurement(monkeypatch):
    monkeypatch.setattr(fb, "train_sine_forecaster", lambda hidden: None)
    monkeypatch.setattr(
        fb,
        "latency_run",
        lambda *a, **k: {"p50_ms": 1.0, "p99_ms": 2.0, "updates_per_s": 1.0, "published": 1},
    )
    monkeypatch.setattr(
        fb,
        "drift_run",
        lambda *a, **k: {
            "streams": 8,
            "error_before_drift": 0.0,
            "frozen_error_after": 1.0,
            "finetuned_error_at_recovery": 0.4,
            "recovered_steps": 10,
            "recovered_s": 1.0,
            "versions_published": 1,
            "checks": {"recovered": True},
        },
    )
    monkeypatch.setattr(
        "rnnstream.demo.run_demo",
        lambda **k: _summary(45_000.0 if k["finetune"] else 50_000.0, k["finetune"], 3.0, 9.0),
    )
    without = fb.run_finetune_benchmarks(quick=True, rates=(2000.0,), progress=lambda m: None)
    assert "demo" not in without and len(fb.render_tables(without)) == 2
    results = fb.run_finetune_benchmarks(
        quick=True, rates=(2000.0,), progress=lambda m: None, demo_seconds=10
    )
    assert results["checks"]["demo"] is True and len(fb.render_tables(results)) == 3
