"""Sinks and dead letters on local files (and the standard streams).

- ``StdoutSink``, ``JsonLinesSink``: one JSON line per output, ``{"stream": stream_id, **doc}``.
- ``CsvSink``: one CSV row per output under a header (lists and arrays as JSON text).
- ``NullSink``: counts outputs and drops them (benchmarks).
- ``JsonLinesDeadLetters``: one JSON line per dead letter, ``{"reason", "key", "topic", "partition",
  "position", "ts", "raw"}``.

Files are opened in append mode; ``flush`` makes what was written durable (flush and fsync).
"""

from __future__ import annotations

import contextlib
import csv as _csv
import os
import sys
from pathlib import Path
from typing import IO, Any, TextIO

import numpy as np
import orjson

from connectors.base import DeadLetter, Output
from connectors.codec import encode_document

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _sync(handle: IO[Any]) -> None:
    handle.flush()
    with contextlib.suppress(OSError, ValueError):  # not a file (a pipe, a terminal, an in-memory stream)
        os.fsync(handle.fileno())


def _output_line(output: Output) -> bytes:
    """``{"stream": stream_id, **doc}`` as one JSON line (numpy arrays as lists)."""
    return encode_document({"stream": output.stream_id, **output.doc}) + b"\n"


class StdoutSink:
    """Outputs as JSON lines on ``stream`` (default: ``sys.stdout`` at construction)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def write(self, outputs: list[Output]) -> None:
        self.stream.write("".join(_output_line(o).decode() for o in outputs))

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.flush()  # the stream is not ours to close


class JsonLinesSink:
    """Outputs as JSON lines appended to the file at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed by close())

    def write(self, outputs: list[Output]) -> None:
        self._file.write(b"".join(_output_line(o) for o in outputs))

    def flush(self) -> None:
        _sync(self._file)

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


class NullSink:
    """Counts outputs (``outputs``) and write calls (``writes``), keeps nothing."""

    def __init__(self) -> None:
        self.outputs = 0
        self.writes = 0

    def write(self, outputs: list[Output]) -> None:
        self.outputs += len(outputs)
        self.writes += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _cell(value: Any) -> Any:
    """A document value as a CSV cell: ``None`` empty, lists/arrays/objects as JSON text, numpy
    scalars as numbers."""
    if value is None:
        return ""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple | dict | np.ndarray):
        return orjson.dumps(value, option=_JSON_OPTIONS).decode()
    return value


class CsvSink:
    """Outputs as CSV rows appended to ``path`` under a header of ``columns``: by default the existing
    file's header, else ``stream`` and the first document's keys. A new (or empty) file gets the header;
    document keys outside ``columns`` are dropped, missing ones left empty."""

    def __init__(self, path: str | Path, columns: list[str] | None = None) -> None:
        self.path = Path(path)
        existing = _csv_header(self.path)
        if existing and columns is not None and list(columns) != existing:
            raise ValueError(f"{self.path} has columns {existing}, not {list(columns)}; write a new file")
        self.columns: list[str] | None = existing or (list(columns) if columns is not None else None)
        self._needs_header = not existing
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._writer = _csv.writer(self._file)

    def write(self, outputs: list[Output]) -> None:
        if not outputs:
            return
        if self.columns is None:
            self.columns = ["stream", *(k for k in outputs[0].doc if k != "stream")]
        if self._needs_header:
            self._writer.writerow(self.columns)
            self._needs_header = False
        for o in outputs:
            row = {"stream": o.stream_id, **o.doc}
            self._writer.writerow([_cell(row.get(c)) for c in self.columns])

    def flush(self) -> None:
        _sync(self._file)

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def _csv_header(path: Path) -> list[str] | None:
    """The header row of an existing, non-empty CSV file; ``None`` otherwise."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(_csv.reader(f), None) or None
    except FileNotFoundError:
        return None


def dead_letter_line(letter: DeadLetter) -> bytes:
    """One dead letter as a JSON line (``DeadLetter.document``); a ``raw`` that still cannot be written
    (an array of objects...) as its ``repr``, keeping the reason and where it came from."""
    doc = letter.document()
    try:
        return orjson.dumps(doc, option=_JSON_OPTIONS) + b"\n"
    except TypeError:  # JSONEncodeError is one
        return orjson.dumps({**doc, "raw": repr(letter.raw)}, option=_JSON_OPTIONS) + b"\n"


class JsonLinesDeadLetters:
    """Dead letters as JSON lines appended to ``path`` (``"-"``: standard error)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._file: IO[bytes] | None = None if self.path == "-" else open(path, "ab")  # noqa: SIM115

    def write(self, letter: DeadLetter) -> None:
        line = dead_letter_line(letter)
        if self._file is None:
            sys.stderr.write(line.decode())
        else:
            self._file.write(line)

    def flush(self) -> None:
        if self._file is None:
            sys.stderr.flush()
        elif not self._file.closed:
            _sync(self._file)

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
