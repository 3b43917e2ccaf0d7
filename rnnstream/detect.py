"""Anomaly scores for CSV files (``rnnstream detect``), and their NAB score (``rnnstream nab``).

Each file is one stream; all files of a call run concurrently through one pipeline (CSV source merged by
timestamp → reading checks → the scoring stage → a JSON-lines file, refused rows to a dead-letters file),
exactly as a live sensor pipeline would run them: no file length, no min/max, nothing from the future.

Row alignment: every data row of a file (a non-blank CSV record after the header, as the CSV source reads
it) reaches the decoder exactly once, as a message whose ``position`` is its global sequence number; a
thin wrapper around the pipeline's decoder notes each (position → file, row). Each message then gives
either one output document (per stream in input order) or one dead letter (with its position). So a
file's rows, in order, are its recorded positions sorted; the refused ones are those with a dead letter,
and the others take the stream's output documents in order. This holds for duplicate rows too: nothing is
matched by content.

A row without a timestamp is refused here ("no timestamp"): a live source would stamp it with its arrival
time, which for a file replay would put every later row out of order.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from connectors.base import Message
from connectors.codec import Decoded, DecodeError
from rnnstream.config import ServiceConfig
from rnnstream.nab import PROFILES, ProfileResult, ScoredFile, score_corpus, windows_as_rows
from rnnstream.pipeline import MessageDecoder
from rnnstream.service import build_pipeline

MODEL = Path(__file__).resolve().parents[1] / "models" / "assets" / "detector_gru.safetensors"

# Online adaptation of the forecaster: TBPTT(16, 64) rounds in the step loop (deterministic), two Adam
# updates of 32 chunks per 64 fresh chunks; a version is served only when it beats the serving one on
# held-back chunks (``engine.finetune``).
ONLINE = {
    "schedule": "inline",
    "isolation": "thread",
    "k1": 16,
    "k2": 64,
    "lr": 1e-3,
    "batch_size": 32,
    "updates_per_round": 2,
    "min_new_chunks": 64,
}


@dataclass(frozen=True)
class Variant:
    """The detector ``detect`` and ``nab`` run, and the ablations of README's NAB table."""

    online: bool = True  # adapt the forecaster online (False: the frozen generic model)
    calibration: bool = True  # the anomaly likelihood (False: the raw surprise is the score)
    refractory: bool = True  # hold alerts back after one (False: every reading may alert)
    record: bool = True  # discount a score no bigger than the stream's best so far
    season: bool = True  # also compare each reading with the same time a week before
    forecaster: str = "model"  # "last": the naive last-value forecast instead of the model

    def scoring(self) -> dict[str, Any]:
        """The ``scoring`` config section: the detector's defaults, with the switched-off parts."""
        section: dict[str, Any] = {"kind": "detector", "forecaster": self.forecaster}
        if not self.calibration:  # the raw surprise is the score: alert on a large one
            section.update(calibration="none", threshold=0.99)
        if not self.refractory:
            section["refractory"] = 0
        if not self.record:
            section["record_discount"] = None
        if not self.season:
            section["season_s"] = None
        return section


TIMESTAMP_COLUMN, VALUE_COLUMN = "timestamp", "value"
NOTICE = "accepted: "  # dead letters with this prefix report an accepted reading (a gap, a flat line)


def pipeline_config(paths: Sequence[Path], workdir: Path, variant: Variant = Variant()) -> dict[str, Any]:
    """The pipeline's configuration (``rnnstream.config.ServiceConfig`` as a dict) for scoring ``paths``,
    writing ``workdir/scores.jsonl`` and ``workdir/dead-letters.jsonl``. The one place it is set."""
    online = variant.online and variant.forecaster == "model"
    return {
        "model": str(MODEL),
        # escaped: the source takes glob patterns; a file name with ``[`` or ``*`` is meant as it is
        "source": {"type": "csv", "paths": [glob.escape(str(p)) for p in paths], "channels": [VALUE_COLUMN]},
        "sink": {"type": "jsonl", "path": str(workdir / "scores.jsonl")},
        "dead_letters": {"type": "file", "path": str(workdir / "dead-letters.jsonl")},
        "readings": {"flatline_after": None},
        "scoring": variant.scoring(),
        "engine": {"device": "cpu"},
        "checkpoint": {"interval_ms": 60_000},
        **({"finetune": dict(ONLINE, versions_dir=str(workdir / "versions"))} if online else {}),
    }


class _RecordingDecoder:
    """Wraps the pipeline's decoder: notes every message's row by position (``rows``: position →
    (stream, timestamp text, value text)) and refuses a reading without a timestamp."""

    def __init__(self, inner: MessageDecoder) -> None:
        self.inner = inner
        self.rows: dict[int, tuple[str, str, str]] = {}

    def decode(self, message: Message) -> Decoded:
        row = message.payload if isinstance(message.payload, dict) else {}
        texts = (_text(row.get(TIMESTAMP_COLUMN)), _text(row.get(VALUE_COLUMN)))
        self.rows[message.position] = (str(message.key), *texts)
        decoded = self.inner.decode(message)
        if decoded.ts is None:
            why = f"no timestamp: column {TIMESTAMP_COLUMN!r} is empty or absent"
            raise DecodeError(why, "bad_timestamp")
        return decoded


@dataclass(frozen=True)
class FileRun:
    """One input file after the pipeline, per data row in input order (all lists of the same length):
    ``timestamps`` and ``values`` the row's cells as the input has them (``""`` when absent), ``docs`` the
    pipeline's output document (``None`` when refused), ``refused`` the dead letter's reason (``""`` when
    scored)."""

    name: str
    path: Path
    timestamps: list[str]
    values: list[str]
    docs: list[dict[str, Any] | None]
    refused: list[str]


def _text(cell: Any) -> str:
    """A CSV cell as text: ``""`` when absent (a short row, a row the csv module could not read)."""
    return cell if isinstance(cell, str) else ""


def run_files(paths: Sequence[Path], workdir: Path, variant: Variant = Variant()) -> dict[str, FileRun]:
    """Run ``paths`` through one pipeline; each file's rows, documents and refusals by its stem.
    Raises ``ValueError`` when two files share a stem, ``OSError`` when one cannot be read."""
    config = ServiceConfig.model_validate(pipeline_config(paths, workdir, variant))
    pipeline = build_pipeline(config)
    recorder = _RecordingDecoder(pipeline.decoder)
    pipeline.decoder = recorder
    pipeline.run()
    outputs = _read_outputs(workdir / "scores.jsonl")
    refusals = _read_refusals(workdir / "dead-letters.jsonl")
    positions: dict[str, list[int]] = {Path(p).stem: [] for p in paths}
    for position in sorted(recorder.rows):
        positions[recorder.rows[position][0]].append(position)
    return {
        name: _align(Path(p), positions[name], recorder.rows, outputs.get(name, []), refusals)
        for p, name in ((p, Path(p).stem) for p in paths)
    }


def _read_outputs(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The sink's documents by stream, each stream's in input order."""
    docs: dict[str, list[dict[str, Any]]] = {}
    if path.exists():
        with open(path) as f:
            for line in f:
                doc = json.loads(line)
                docs.setdefault(doc["stream"], []).append(doc)
    return docs


def _read_refusals(path: Path) -> dict[int, str]:
    """Refused messages: position → reason (notices about accepted readings left out)."""
    refused: dict[int, str] = {}
    if path.exists():
        with open(path) as f:
            for line in f:
                letter = json.loads(line)
                if not letter["reason"].startswith(NOTICE):
                    refused[int(letter["position"])] = letter["reason"]
    return refused


def _align(
    path: Path,
    positions: list[int],
    recorded: dict[int, tuple[str, str, str]],
    docs: list[dict[str, Any]],
    refusals: dict[int, str],
) -> FileRun:
    """File ``path``'s rows (its messages' ``positions``, increasing = input order) with their documents
    (the stream's, in order) or refusals (see the module docstring)."""
    accepted = sum(p not in refusals for p in positions)
    if accepted != len(docs):
        raise RuntimeError(f"{path}: {len(docs)} scores for {accepted} accepted rows; cannot align them")
    answers = iter(docs)
    return FileRun(
        path.stem,
        path,
        [recorded[p][1] for p in positions],
        [recorded[p][2] for p in positions],
        [None if p in refusals else next(answers) for p in positions],
        [refusals.get(p, "") for p in positions],
    )


@dataclass(frozen=True)
class FileScores:
    """The rows of one file the pipeline answered (a refused row, e.g. a non-numeric value, is in the dead
    letters instead), in order: ``ts`` (seconds), ``value`` and ``score`` (the anomaly score)."""

    name: str
    ts: np.ndarray
    value: np.ndarray
    score: np.ndarray


def score_files(paths: Sequence[Path], workdir: Path, variant: Variant = Variant()) -> dict[str, FileScores]:
    """Run ``paths`` through one pipeline; each file's scores by its stem."""
    scores = {}
    for name, run in run_files(paths, workdir, variant).items():
        docs = [d for d in run.docs if d is not None]
        cols = [[float(d[k]) for d in docs] for k in ("ts", "value", "anomaly_score")]
        scores[name] = FileScores(name, *(np.array(c, np.float64) for c in cols))
    return scores


@dataclass(frozen=True)
class NabReport:
    profiles: dict[str, ProfileResult]
    files: int
    rows: int
    seconds: float


def nab(data: Path, labels: Path, variant: Variant = Variant()) -> NabReport:
    """Score every ``data/<category>/<file>.csv`` named in ``labels`` (NAB's ``combined_windows.json``)."""
    windows = json.loads(labels.read_text())
    paths = [data / rel for rel in sorted(windows) if (data / rel).exists()]
    if not paths:
        raise FileNotFoundError(f"no file of {labels} under {data}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rnnstream-nab-") as tmp:
        scores = score_files(paths, Path(tmp), variant)
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


# ---- rnnstream detect ----------------------------------------------------------------------------------

FIRST_COLUMNS = ("timestamp", "value", "anomaly_score")
REFUSED_COLUMN = "refused"
DEFAULT_EXTRAS = ("prediction", "error", "alert", "forecast")  # when no row of the call was scored
_NOT_EXTRA = frozenset({"stream", "ts", "value", "anomaly_score", "model_version"})

Windows = dict[str, list[tuple[float, float]]]  # labels key ("category/file.csv") → (start, end) seconds


class DetectError(ValueError):
    """A call that cannot be run as given (a missing file, two files of one name, bad labels): one line."""


@dataclass(frozen=True)
class FileReport:
    """What ``detect`` wrote for one input: ``rows`` data rows, ``refused`` of them refused, ``alerts``
    rows alerted; ``csv`` and ``png`` (``None`` without a plot) the files written."""

    name: str
    rows: int
    refused: int
    alerts: int
    csv: Path
    png: Path | None


def check_inputs(paths: Sequence[Path], out: Path) -> None:
    """Raise ``DetectError`` unless every path is a readable file, the stems differ and no output would
    overwrite an input."""
    if not paths:
        raise DetectError("no input file given")
    for p in paths:
        if not p.is_file():
            raise DetectError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise DetectError(f"{seen[p.stem]} and {p} have one name ({p.stem!r}): their outputs would clash")
        seen[p.stem] = p
    inputs = {p.resolve() for p in paths}
    for p in paths:
        if (out / f"{p.stem}.csv").resolve() in inputs:
            raise DetectError(f"{out / (p.stem + '.csv')} is an input: choose another --out folder")
    if out.exists() and not out.is_dir():
        raise DetectError(f"{out}: not a folder")


def load_windows(labels: Path) -> Windows:
    """NAB's ``combined_windows.json`` (``{"category/file.csv": [["2014-04-10 07:15:00.000000", ...]]}``,
    UTC) as seconds; ``DetectError`` when it cannot be read."""
    try:
        doc = json.loads(labels.read_text())
        return {str(k): [(_seconds(a), _seconds(b)) for a, b in spans] for k, spans in doc.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise DetectError(f"{labels}: not a NAB windows file ({type(exc).__name__}: {exc})") from exc


def windows_for(path: Path, windows: Windows) -> list[tuple[float, float]]:
    """The labelled windows of ``path``: the key that ends its path (``category/file.csv`` of
    ``.../data/category/file.csv``), else the one key with its file name; none when no key matches."""
    posix = path.resolve().as_posix()
    for key, spans in windows.items():
        if posix.endswith("/" + key.lstrip("/")):
            return spans
    named = [spans for key, spans in windows.items() if Path(key).name == path.name]
    return named[0] if len(named) == 1 else []


def detect(
    paths: Sequence[Path], out: Path, labels: Path | None = None, plot: bool = True
) -> list[FileReport]:
    """Score ``paths`` (one stream each, all in one pipeline) and write ``out/<stem>.csv`` (and
    ``out/<stem>.png`` when ``plot``) per file; see ``write_csv`` for the columns."""
    paths = [Path(p) for p in paths]
    check_inputs(paths, out)
    windows = load_windows(labels) if labels is not None else {}
    with tempfile.TemporaryDirectory(prefix="rnnstream-detect-") as tmp:
        runs = run_files(paths, Path(tmp))
    out.mkdir(parents=True, exist_ok=True)
    extras = _extra_columns(runs.values())
    reports = []
    for path in paths:
        run = runs[path.stem]
        csv_path = write_csv(run, out / f"{run.name}.csv", extras)
        png = None
        if plot:
            from rnnstream.plot import plot_run

            png = plot_run(run, out / f"{run.name}.png", windows_for(path, windows))
        reports.append(_report(run, csv_path, png))
    return reports


def _extra_columns(runs: Iterable[FileRun]) -> list[str]:
    """The scoring stage's document fields besides ts, value, anomaly_score and model_version, in its
    order (the first scored row of the call decides, so that every file of a call has one header)."""
    for run in runs:
        for doc in run.docs:
            if doc is not None:
                return [k for k in doc if k not in _NOT_EXTRA]
    return list(DEFAULT_EXTRAS)


def write_csv(run: FileRun, path: Path, extras: Sequence[str]) -> Path:
    """``timestamp,value,anomaly_score,<extras>,refused``: one line per input data row, in input order;
    ``timestamp`` and ``value`` as the input has them, the rest from the row's document. A refused row has
    ``anomaly_score`` 0, empty extras and the dead letter's reason under ``refused``."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*FIRST_COLUMNS, *extras, REFUSED_COLUMN])
        for i, doc in enumerate(run.docs):
            score = 0.0 if doc is None else doc.get("anomaly_score")
            cells = [_cell(None if doc is None else doc.get(k)) for k in extras]
            writer.writerow([run.timestamps[i], run.values[i], _cell(score), *cells, run.refused[i]])
    return path


def _cell(value: Any) -> Any:
    """A document value as a CSV cell: ``None`` empty, a non-finite float as text, lists/objects as JSON."""
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list | dict):
        return json.dumps(value)
    return value


def _report(run: FileRun, csv_path: Path, png: Path | None) -> FileReport:
    alerts = sum(bool(d.get("alert")) for d in run.docs if d is not None)
    refused = sum(d is None for d in run.docs)
    return FileReport(run.name, len(run.docs), refused, alerts, csv_path, png)
