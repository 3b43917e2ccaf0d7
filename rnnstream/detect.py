"""Anomaly scores for CSV files, and their NAB score (``rnnstream nab``).

Each file is one stream; all files of a call run concurrently through one pipeline (CSV source merged by
timestamp → reading checks → the forecast scorer → a JSON-lines file), exactly as a live sensor
pipeline would run them: no file length, no min/max, nothing from the future.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rnnstream.config import ServiceConfig
from rnnstream.nab import PROFILES, ProfileResult, ScoredFile, score_corpus, windows_as_rows
from rnnstream.service import build_pipeline

MODEL = Path(__file__).resolve().parents[1] / "models" / "assets" / "sensor_lstm.safetensors"


@dataclass(frozen=True)
class FileScores:
    """The rows of one file the pipeline answered (a refused row, e.g. a non-numeric value, is in the dead
    letters instead), in order: ``ts`` (seconds), ``value`` and ``score`` (the anomaly score)."""

    name: str
    ts: np.ndarray
    value: np.ndarray
    score: np.ndarray


def score_files(paths: Sequence[Path], workdir: Path) -> dict[str, FileScores]:
    """Run ``paths`` through one pipeline; each file's scores by its stem."""
    out = workdir / "scores.jsonl"
    config = ServiceConfig.model_validate(
        {
            "model": str(MODEL),
            "source": {"type": "csv", "paths": [str(p) for p in paths], "channels": ["value"]},
            "sink": {"type": "jsonl", "path": str(out)},
            "dead_letters": {"type": "file", "path": str(workdir / "dead-letters.jsonl")},
            "readings": {"flatline_after": None},
            "scoring": {"kind": "forecast"},
            "engine": {"device": "cpu"},
            "checkpoint": {"interval_ms": 60_000},
        }
    )
    build_pipeline(config).run()
    rows: dict[str, list[tuple[float, float, float]]] = {Path(p).stem: [] for p in paths}
    if out.exists():
        with open(out) as f:
            for line in f:
                doc = json.loads(line)
                rows[doc["stream"]].append((doc["ts"], doc["value"], doc["anomaly_score"]))
    return {
        name: FileScores(name, *(np.array(col, np.float64) for col in zip(*r, strict=True)))
        if r
        else FileScores(name, np.zeros(0), np.zeros(0), np.zeros(0))
        for name, r in rows.items()
    }


@dataclass(frozen=True)
class NabReport:
    profiles: dict[str, ProfileResult]
    files: int
    rows: int
    seconds: float


def nab(data: Path, labels: Path) -> NabReport:
    """Score every ``data/<category>/<file>.csv`` named in ``labels`` (NAB's ``combined_windows.json``)."""
    windows = json.loads(labels.read_text())
    paths = [data / rel for rel in sorted(windows) if (data / rel).exists()]
    if not paths:
        raise FileNotFoundError(f"no file of {labels} under {data}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rnnstream-nab-") as tmp:
        scores = score_files(paths, Path(tmp))
    seconds = time.perf_counter() - start
    scored = []
    for path in paths:
        s = scores[path.stem]
        rel = str(path.relative_to(data))
        spans = [(_seconds(a), _seconds(b)) for a, b in windows[rel]]
        scored.append(ScoredFile(path.stem, s.score, windows_as_rows(s.ts, spans)))
    results = {name: score_corpus(scored, profile) for name, profile in PROFILES.items()}
    return NabReport(results, len(paths), sum(len(f.scores) for f in scored), seconds)


def _seconds(text: str) -> float:
    """A NAB label time (``2014-04-10 07:15:00.000000``, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()
