"""Audio benchmark: the tape's bookkeeping, the stream-count search, the tables' marks, and a quick run end
to end (structure and positive figures only: speed is measured by ``rnnstream bench audio``, not tested)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from benchmarks.audio_bench import (
    FSDD,
    TARGETS,
    StreamRun,
    build_tape,
    main,
    render_tables,
    search,
)
from tests.benchmarks.tables import table_rows as _rows


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


def _results(met: bool) -> dict:
    """A results document whose judged figures sit exactly at the targets (``met``) or just past them."""
    streams = TARGETS["streams_min"] if met else TARGETS["streams_min"] - 1
    rtf = TARGETS["single_rtf_max"] if met else 1.01 * TARGETS["single_rtf_max"]
    compute_p99 = TARGETS["latency_p99_max_ms"] if met else TARGETS["latency_p99_max_ms"] + 0.001
    label_p99 = TARGETS["label_p99_max_ms"] if met else TARGETS["label_p99_max_ms"] + 0.001
    run = {
        "streams": streams,
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
    samples = [{"audio_s": 5.0 * k, "rss_bytes": (500 << 20) + k * (1 << 20)} for k in range(1, 5)]
    return {
        "machine": {"logical_cores": 2},
        "config": {"input_rate": 16_000, "chunk_ms": 100.0, "duty_cycle": 0.5},
        "concurrent": {"runs": [run], "max_realtime_streams": streams, "first_failing_streams": None},
        "baseline": {
            "runs": [{**run, "streams": 50, "realtime": False, "stopped_early": True}],
            "max_realtime_streams": 50,
            "first_failing_streams": 100,
        },
        "single": {"audio_s": 30.0, "rnnstream": {"rtf": rtf}, "baseline": {"rtf": 0.2}},
        "latency": {
            "audio_s": 30.0,
            "other_processes_cores": 0.1,
            "compute": {"count": 100, "p50_ms": 0.2, "p99_ms": compute_p99, "max_ms": 3.0},
            "compute_in_recordings": {"count": 50, "p50_ms": 0.3, "p99_ms": 0.6, "max_ms": 3.0},
            "frame_out": {"count": 100, "p50_ms": 50.0, "p99_ms": compute_p99, "max_ms": 105.0},
            "label": {"count": 10, "p50_ms": 100.0, "p99_ms": label_p99, "max_ms": 149.5},
        },
        "memory": {
            "streams": 1000,
            "audio_s": 20.0 if met else 120.0,
            "planned_audio_s": 120.0,
            "labels": 5,
            "rss_before_bytes": 400 << 20,
            "rss_recognizer_bytes": 401 << 20,
            "samples": samples,
            "bytes_per_stream": 4096.0,
            "growth_middle_to_end_bytes": 1 << 20,
            "flat": met,  # measured by the memory run; the table shows it
        },
    }


@pytest.mark.parametrize("met", [True, False], ids=["at-the-targets", "just-past-them"])
def test_summary_marks_follow_the_targets(met: bool):
    tables = render_tables(_results(met))
    summary = {r["figure"]: r for r in _rows(tables[1])}
    mark = "✓" if met else "✗"
    streams = summary["max real-time streams"]
    assert streams["rnnstream"] == f"{TARGETS['streams_min'] - (not met):,} {mark} (no failure found)"
    assert streams["baseline"] == "50" and streams["rnnstream vs baseline"] == "20×"  # 1,000 or 999 / 50
    single = summary["single-stream RTF (30 s of audio)"]
    assert single["rnnstream"] == ("0.0100 ✓" if met else "0.0101 ✗")
    assert single["rnnstream vs baseline"] == ("20.0× faster" if met else "19.8× faster")  # 0.2 / RTF
    for figure in ("push + tick p99 ms, 10 ms hops", "frame out beyond its hop p99 ms"):
        assert summary[figure]["rnnstream"] == ("1.000 ✓" if met else "1.001 ✗")
    assert summary["label after the recording's end p99 ms"]["rnnstream"] == (
        "150.000 ✓" if met else "150.001 ✗"
    )
    assert summary["RSS per stream (1,000 streams), growth"]["rnnstream"] == f"4.0 KiB, 1.0 MiB {mark}"


def test_tables_compute_shares_growth_and_the_cap():
    tables = render_tables(_results(met=True))
    (ours, base) = _rows(tables[0])
    assert ours["labels (right)"] == "10 (90%)" and ours["real time"] == "yes"
    assert base["labels (right)"] == "-" and base["real time"] == "no (stopped)"
    memory = {r["point"]: r for r in _rows(tables[3])}
    assert memory["start"]["growth since start MiB"] == "0.0"
    assert memory["middle"]["RSS MiB"] == "503.0" and memory["end"]["growth since start MiB"] == "3.0"
    assert "wall-time cap (planned 120 s)" in str(tables[3].title)  # 20 of 120 s covered
    assert "wall-time cap" not in str(render_tables(_results(met=False))[3].title)  # all 120 s covered
    no_labels = _results(met=True)
    no_labels["latency"]["label"] = {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    summary = {r["figure"]: r for r in _rows(render_tables(no_labels)[1])}
    assert summary["label after the recording's end p99 ms"]["rnnstream"] == "- (none)"


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
