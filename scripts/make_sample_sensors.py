"""Write ``configs/data/machines.csv``: the small sensor file the shipped CSV config replays.

Three machines (``pump-1``, ``pump-2``, ``fan-1``), one reading every 5 minutes for 3 days, in one file
with a ``machine`` column: a daily cycle plus noise, with one anomaly each (a spike, a level shift, a
stuck sensor). Deterministic.

    python scripts/make_sample_sensors.py [--out configs/data/machines.csv]
"""

from __future__ import annotations

import argparse
import csv
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "configs" / "data" / "machines.csv"
STEP = timedelta(minutes=5)
ROWS = 3 * 24 * 12


def readings(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = np.arange(ROWS)
    day = np.sin(2 * np.pi * t / (24 * 12))
    pump1 = 50 + 10 * day + rng.normal(0, 0.8, ROWS)
    pump1[600] += 25  # a spike
    pump2 = 70 + 6 * day + rng.normal(0, 0.5, ROWS)
    pump2[500:] += 12  # a level shift
    fan = 1200 + 150 * day + rng.normal(0, 10, ROWS)
    fan[700:760] = fan[700]  # a stuck sensor
    return {"pump-1": pump1, "pump-2": pump2, "fan-1": fan}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    series = readings(np.random.default_rng(0))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["timestamp", "machine", "value"])
        for i in range(ROWS):
            ts = (start + i * STEP).strftime("%Y-%m-%d %H:%M:%S")
            for name, values in series.items():
                out.writerow([ts, name, f"{values[i]:.3f}"])


if __name__ == "__main__":
    main()
