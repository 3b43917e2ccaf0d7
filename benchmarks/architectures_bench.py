"""What each recurrent architecture costs per event, against what a user would write without rnnstream.

Run: ``rnnstream bench architectures`` (or ``python -m benchmarks.architectures_bench``). Each
architecture measures itself in ``benchmarks/<name>_cost.py`` (``rows(quick) -> list[dict]``): the
engine's cost per event at a realistic batch of interleaved streams, the honest baseline's in the same
run (named in its row), and the speedup. One torch thread throughout, as the engine's default on two
cores. Rows: ``architecture``, ``setting``, ``engine_us_per_event``, ``baseline``,
``baseline_us_per_event``, ``speedup``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from benchmarks.engine_bench import machine_info
from benchmarks.report import bench_console, publish

DEFAULT_JSON = Path("results/architectures_bench.json")
COST_MODULES = ("rollout_cost", "attention_cost", "utterance_cost", "text_cost", "video_cost")
"""The architectures measured, in README order: ``benchmarks/<module>.py`` each."""


def collect(quick: bool, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Every cost module's rows (``only``: a subset of ``COST_MODULES``), one torch thread."""
    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in only or COST_MODULES:
            module = importlib.import_module(f"benchmarks.{name}")
            started = time.perf_counter()
            rows.extend(module.rows(quick))
            timings[name] = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    return {"rows": rows, "seconds": timings}


def render_table(rows: list[dict[str, Any]], machine: dict[str, Any]) -> Table:
    """One table: µs per event through the engine and through the baseline, and the speedup."""
    title = f"Architectures: µs per event, 1 torch thread ({machine['cpu_model']}, torch {machine['torch']})"
    table = Table(title=title)
    for col, justify in [
        ("architecture", "left"),
        ("setting", "left"),
        ("rnnstream µs/event", "right"),
        ("baseline", "left"),
        ("baseline µs/event", "right"),
        ("speedup", "right"),
    ]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            str(r["architecture"]),
            str(r["setting"]),
            f"{r['engine_us_per_event']:.2f}",
            str(r["baseline"]),
            f"{r['baseline_us_per_event']:.2f}",
            f"{r['speedup']:.1f}×",
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    parser.add_argument("--only", choices=COST_MODULES, action="append", default=None)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    console = bench_console()
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(torch.device("cpu"))}
    results.update(collect(args.quick, args.only))
    results["elapsed_s"] = time.perf_counter() - started
    publish(console, [render_table(results["rows"], results["machine"])], results, args.json)
    m = results["machine"]
    console.print(f"[dim]{m['cpu_model']}, {m['logical_cores']} cores, torch {m['torch']}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
