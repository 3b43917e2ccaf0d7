"""The soak test's short form (``benchmarks/soak.py``): the real pipeline in a subprocess at 5,000
messages/s with streams coming and going, watched from outside (RSS, slots, threads, open fds, the
checkpoint) for about a minute; the same run with a deliberate slot leak must fail the verdict; and the
verdict itself on made-up series (pure logic).

The short runs shrink oneDNN's primitive cache (``onednn_cache=64``): the cache is bounded (1,024
entries by default, about 100 MB with this model) and takes minutes to fill at this rate, which the long
run's ten-minute warm-up covers and a one-minute run's twenty seconds do not. Their RSS limits are
looser than the long run's (``SHORT``): a slope fitted over forty seconds is noisy."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.soak import Limits, Sample, Workload, judge, run_soak

SHORT = Limits(rss_growth_mb=5.0, rss_slope_mb_h=600.0)
"""A 5 MB rise between the second and last twenty seconds at 5,000 msg/s is 50 bytes an event."""


def _failed(result) -> set[str]:
    return {c.name for c in result.checks if not c.ok}


def _table(result) -> str:
    return "\n".join(f"{c.name}: {c.second:.1f} → {c.last:.1f} ({c.limit}) {c.ok}" for c in result.checks)


@pytest.mark.soak
@pytest.mark.slow
def test_the_verdict_catches_ended_streams_that_keep_their_slots(tmp_path):
    """The control run: ``StateStore.release`` made a no-op in the worker and no TTL to clean up after it;
    every ended stream keeps its slot, and the slot check fails (the checkpoint does not grow: the
    pipeline still deletes ended streams' rows)."""
    workload = Workload(rate_hz=5000, end_fraction=1.0, ttl_s=None, onednn_cache=64, leak="ended")
    result = run_soak(workload, SHORT, duration_s=30, sample_s=2, workdir=tmp_path)
    assert "active streams, mean" in _failed(result), _table(result)


@pytest.mark.soak
@pytest.mark.slow
def test_streams_left_to_ttl_eviction_leave_the_checkpoint_and_rss_flat(tmp_path):
    """A minute of streams coming and going: half end with an ``end`` control after ~50 events, half go
    silent instead (the engine evicts them after ``ttl_s``); a service whose devices come and go must not
    keep them forever. (Before the pipeline heard of the engine's
    drops, its checkpoint grew ~20 KB/s here.)"""
    workload = Workload(rate_hz=5000, end_fraction=0.5, ttl_s=2.0, onednn_cache=64)
    result = run_soak(workload, SHORT, duration_s=60, sample_s=2, workdir=tmp_path)
    last = result.samples[-1]  # both ways out were taken many times: an end control, and TTL eviction
    assert last.evictions > 1000 and last.ended > 1000 and last.events > 0.95 * 5000 * 60
    assert result.ok, _table(result)


# ---- the verdict on made-up series (pure logic) ---------------------------------------------------------
def _samples(n: int = 30, **series) -> list[Sample]:
    """``n`` samples 10 s apart of a flat, healthy run; ``series`` overrides a field with a function of
    the sample's index."""
    out = []
    for k in range(n):
        base = Sample(
            t_s=10.0 * (k + 1),
            rss_mb=600.0 + (k % 2) * 0.5,
            threads=4,
            fds=5,
            cpu_pct=40.0,
            events=50_000 * (k + 1),
            messages=50_000 * (k + 1),
            offered=50_000 * (k + 1),
            active_streams=2000 + (k % 3),
            capacity=4096,
            evictions=10 * k,
            started=1000 * k,
            ended=500 * k,
            abandoned=0,
            checkpoints=10 * k,
            checkpoint_kb=700.0,
        )
        out.append(dataclasses.replace(base, **{name: f(k) for name, f in series.items()}))
    return out


def test_a_flat_run_passes_every_check():
    checks = judge(_samples(), Limits())
    assert [c.name for c in checks if not c.ok] == []
    assert len(checks) == 8


@pytest.mark.parametrize(
    ("series", "failing"),
    [
        ({"rss_mb": lambda k: 600.0 + 0.1 * k}, {"RSS slope, MB/h (after warm-up)"}),  # 36 MB/h
        ({"rss_mb": lambda k: 600.0 + (20.0 if k >= 20 else 0.0)}, {"RSS, mean MB"}),
        ({"active_streams": lambda k: 2000 + 100 * k}, {"active streams, mean"}),
        ({"capacity": lambda k: 4096 if k < 20 else 8192}, {"slot capacity, max"}),
        ({"checkpoint_kb": lambda k: 700.0 + 30 * k}, {"checkpoint KB, mean"}),
        ({"threads": lambda k: 4 + k // 3}, {"threads, max"}),
        ({"fds": lambda k: 5 + k // 4}, {"open fds, max"}),
        ({"messages": lambda k: 40_000 * (k + 1)}, {"messages offered → processed"}),
    ],
)
def test_each_kind_of_leak_fails_its_own_check(series, failing):
    checks = judge(_samples(**series), Limits())
    assert {c.name for c in checks if not c.ok} >= failing


def test_too_short_a_run_is_not_judged():
    with pytest.raises(ValueError, match="too few"):
        judge(_samples(n=4), Limits())
