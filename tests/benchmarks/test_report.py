"""Benchmark results are written as strict JSON."""

from __future__ import annotations

import json
import math

from benchmarks.report import bench_console, publish


def test_results_with_missing_figures_are_strict_json(tmp_path) -> None:
    path = tmp_path / "r.json"
    publish(bench_console(), [], {"first_version_s": math.nan, "rows": [{"p99": math.inf}, (1.5, 2)]}, path)
    loaded = json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert loaded == {"first_version_s": None, "rows": [{"p99": None}, [1.5, 2]]}
