"""Audio benchmark: the tape's bookkeeping, the stream-count search, the tables' marks, and a quick run end
to end (structure and positive figures only: speed is measured by ``rnnstream bench audio``, not tested)."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
from rich.console import Console

from benchmarks.audio_bench import (
    FSDD,
    StreamRun,
    build_tape,
    main,
    render_tables,
    search,
)


def _needs_fsdd() -> None:
    """The shared datasets sit beside the checkout (CI has them): missing there is a failure, not a skip."""
    if FSDD.is_dir():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"no FSDD recordings in {FSDD} (CI=true: ../shared/data must be there)")
    pytest.skip(f"no FSDD recordings in {FSDD}")


def test_tape_is_recordings_and_quiet_gaps_about_half_and_half():
    _needs_fsdd()
    tape = build_tape(8.0, 16_000)
    assert tape.audio.dtype == np.float32 and tape.seconds >= 8.0
    assert 0.3 < tape.duty < 0.7
    first = tape.segments[0]
    assert tape.digit_at(np.array([first[0], first[1] - 1]))[0] == first[2]
    assert tape.digit_at(np.array([first[1], 0]))[0] == -1  # the gap after it, the gap the tape starts with
    assert tape.digit_at(np.array([first[0] + len(tape.audio)]))[0] == first[2]  # wraps around
    gap = tape.audio[: first[0]]
    assert 20 * math.log10(float(np.sqrt(np.mean(gap**2)))) < -55  # quiet noise
    chunks = tape.chunks(np.array([len(tape.audio) - 10, 0]), 0, 1600)
    assert [len(c) for c in chunks] == [1600, 1600]
    assert np.array_equal(chunks[0][10:], tape.audio[:1590])  # wrap-free slice across the tape's end


def _fake(limit: int, calls: list[int]):
    def runner(n: int) -> StreamRun:
        calls.append(n)
        return StreamRun(n, audio_s=1.0, compute_s=n / limit, ticks=[0.01])

    return runner


def test_search_doubles_then_bisects_and_goes_down_when_the_start_fails():
    calls: list[int] = []
    out = search(_fake(1300, calls), 250, 64_000, 3, 1.0, lambda m: None)
    assert calls[:4] == [250, 500, 1000, 2000] and len(calls) == 7
    assert 1000 <= out["max_realtime_streams"] < 1300 < out["first_failing_streams"] <= 2000
    assert [r["streams"] for r in out["runs"]] == sorted(calls)
    calls.clear()
    out = search(_fake(100, calls), 250, 64_000, 0, 1.0, lambda m: None)
    assert calls == [250, 125, 62] and out["max_realtime_streams"] == 62
    calls.clear()
    out = search(_fake(10**9, calls), 4, 16, 3, 1.0, lambda m: None)
    assert calls == [4, 8, 16] and out["first_failing_streams"] is None


def _results() -> dict:
    run = {
        "streams": 1000,
        "audio_s": 10.0,
        "compute_s": 8.0,
        "rtf": 0.8,
        "realtime": True,
        "stopped_early": False,
        "tick_p50_ms": 80.0,
        "tick_p99_ms": 95.0,
        "tick_max_ms": 99.0,
        "labels": 10,
        "labels_correct": 9,
        "other_processes_cores": 0.0,
    }
    samples = [{"audio_s": 5.0 * k, "rss_bytes": 500 << 20} for k in range(1, 5)]
    return {
        "machine": {"logical_cores": 2},
        "config": {"input_rate": 16_000, "chunk_ms": 100.0, "duty_cycle": 0.5},
        "concurrent": {"runs": [run], "max_realtime_streams": 1000, "first_failing_streams": 2000},
        "baseline": {
            "runs": [{**run, "streams": 50}],
            "max_realtime_streams": 50,
            "first_failing_streams": 100,
        },
        "single": {"audio_s": 30.0, "rnnstream": {"rtf": 0.02}, "baseline": {"rtf": 0.2}},
        "latency": {
            "audio_s": 30.0,
            "other_processes_cores": 0.1,
            "compute": {"count": 100, "p50_ms": 0.2, "p99_ms": 0.5, "max_ms": 3.0},
            "compute_in_recordings": {"count": 50, "p50_ms": 0.3, "p99_ms": 0.6, "max_ms": 3.0},
            "frame_out": {"count": 100, "p50_ms": 50.0, "p99_ms": 101.25, "max_ms": 105.0},
            "label": {"count": 10, "p50_ms": 100.0, "p99_ms": 149.5, "max_ms": 149.5},
        },
        "memory": {
            "streams": 1000,
            "audio_s": 20.0,
            "planned_audio_s": 120.0,
            "labels": 5,
            "rss_before_bytes": 400 << 20,
            "rss_recognizer_bytes": 401 << 20,
            "samples": samples,
            "bytes_per_stream": 4096.0,
            "growth_middle_to_end_bytes": 0,
            "flat": True,
        },
    }


def test_tables_mark_the_targets():
    out = io.StringIO()
    console = Console(file=out, width=200)
    for table in render_tables(_results()):
        console.print(table)
    text = out.getvalue()
    assert "1,000 ✓" in text and "20×" in text  # streams: target met, 20x the baseline
    assert "0.0200 ✗" in text and "10.0× faster" in text  # single-stream RTF above 0.01
    assert "0.500 ✓" in text and "101.250 ✗" in text and "149.500 ✓" in text  # compute, frame out, label
    assert "4.0 KiB, 0.0 MiB ✓" in text and "wall-time cap (planned 120 s)" in text


def _positive(d: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        v = d[k]
        assert isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0, (k, v)


@pytest.mark.slow
def test_quick_run_writes_every_table_and_figure(tmp_path, capsys):
    _needs_fsdd()
    path = tmp_path / "audio.json"
    assert main(["--quick", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    for title in ("Concurrent 16 kHz streams", "Summary", "Latency: one stream", "Memory:", "Anchors"):
        assert title in printed
    results = json.loads(path.read_text())
    assert results["quick"] is True
    _positive(results["machine"], ("logical_cores", "torch_threads"))
    _positive(results["config"], ("input_rate", "duty_cycle", "torch_threads_rnnstream", "tape_s"))
    _positive(results["model"], ("parameters",))
    for key in ("concurrent", "baseline"):
        part = results[key]
        assert part["runs"] and part["max_realtime_streams"] >= 0
        for run in part["runs"]:
            _positive(run, ("streams", "audio_s", "compute_s", "rtf", "tick_p50_ms", "tick_max_ms"))
    assert sum(r["labels"] for r in results["concurrent"]["runs"]) > 0  # it does recognise
    single = results["single"]
    _positive(single, ("audio_s",))
    _positive(single["rnnstream"], ("compute_s", "rtf"))
    _positive(single["baseline"], ("compute_s", "rtf"))
    for key in ("compute", "compute_in_recordings", "frame_out"):
        _positive(results["latency"][key], ("count", "p50_ms", "p99_ms", "max_ms"))
    assert results["latency"]["frame_out"]["count"] >= 0.9 * results["latency"]["compute"]["count"]
    mem = results["memory"]
    _positive(mem, ("streams", "audio_s", "rss_before_bytes", "rss_start_bytes", "rss_end_bytes"))
    assert len(mem["samples"]) >= 3 and isinstance(mem["flat"], bool)
