"""Replaying CSV files (NAB's ``timestamp,value`` and any CSV with a header row) as a source.

Each file is one stream named by the file's stem (``Message.key``), or, with ``stream_column``, holds
rows of many streams (``Message.key = None``; the decoder reads the column). A message's payload is its
row as ``dict[str, str]`` (header name → text), to be decoded by ``connectors.readings.ReadingDecoder``.

Rows of all files are merged lazily (one row per file in memory) in timestamp order; ties go by file
order, then row order. A row whose timestamp cannot be parsed keeps its place in its file (its key is
the timestamp of the file's previous row) and goes out to be refused by the decoder. The merge depends
only on what is left of each file, so resuming from per-file row counts emits exactly the rows a full
run would have emitted after that point.

Malformed content never raises out of ``poll``: a row with too many fields carries them under key
``None`` (a list, as ``csv.DictReader`` does), missing fields are absent keys, and a row the csv module
cannot read (or a line over ``MAX_LINE`` characters) is ``{None: "csv: <why>"}``. Invalid UTF-8 reads
as U+FFFD. A file that cannot be opened raises at ``open``.
"""

from __future__ import annotations

import csv as _csv
import heapq
import logging
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from connectors.base import Assignment, Guarantee, Message
from connectors.codec import DecodeError
from connectors.readings import parse_timestamp

log = logging.getLogger("connectors.csv")

MAX_BATCH = 10_000  # rows per poll
MAX_LINE = 1_048_576  # characters; a longer physical line is cut here and its row refused

Row = dict[Any, Any]


class _File:
    """One CSV file read row by row: ``rows`` counts the rows taken (the header excluded)."""

    def __init__(self, path: Path, index: int, delimiter: str, timestamp_column: str) -> None:
        self.path = path
        self.name = str(path)
        self.index = index
        self.timestamp_column = timestamp_column
        self.rows = 0
        self.last_key = -math.inf  # the sort key of the previous row
        self._cut = False  # a line of the row being read was longer than MAX_LINE
        try:
            self._handle: TextIO | None = open(  # noqa: SIM115 (closed by close())
                path, encoding="utf-8-sig", errors="replace", newline=""
            )
        except OSError as exc:
            raise OSError(f"CSV source: cannot open {path}: {exc.strerror or exc}") from exc
        self._reader = _csv.reader(self._lines(), delimiter=delimiter)
        self.header: list[str] | None = None
        self._header_error: str | None = None
        try:
            self._read_header()
        except OSError as exc:
            self.close()
            raise OSError(f"CSV source: cannot read {path}: {exc.strerror or exc}") from exc

    def _lines(self) -> Iterator[str]:
        """The file's physical lines, each cut to ``MAX_LINE`` characters (noted in ``_cut``)."""
        handle = self._handle
        assert handle is not None
        while True:
            line = handle.readline(MAX_LINE)
            if not line:
                return
            if len(line) == MAX_LINE and not line.endswith(("\n", "\r")):
                self._cut = True
                while (rest := handle.readline(MAX_LINE)) and not rest.endswith(("\n", "\r")):
                    pass
            yield line

    def _read_header(self) -> None:
        first = self._next_fields()
        if isinstance(first, str):
            self._header_error = f"csv: unreadable header: {first}"
        elif first is not None:
            self.header = first

    def _next_fields(self) -> list[str] | str | None:
        """The next non-blank record's fields, a reason text when unreadable, ``None`` at the end."""
        while True:
            self._cut = False
            try:
                fields = next(self._reader)
            except StopIteration:
                return None
            except _csv.Error as exc:
                return f"line longer than {MAX_LINE} characters" if self._cut else str(exc)
            if self._cut:
                return f"line longer than {MAX_LINE} characters"
            if fields:
                return fields

    def next_row(self) -> Row | None:
        """The next row as the payload (header name → text), ``None`` when the file is done."""
        if self._handle is None:
            return None
        if self._header_error is not None:
            error, self._header_error = self._header_error, None
            self.close()  # without a header, nothing after it can be read
            return {None: error}
        if self.header is None:  # an empty file
            self.close()
            return None
        fields = self._next_fields()
        if fields is None:
            self.close()
            return None
        if isinstance(fields, str):
            return {None: f"csv: {fields}"}
        header = self.header
        row: Row = dict(zip(header, fields, strict=False))
        if len(fields) > len(header):
            row[None] = fields[len(header) :]
        return row

    def key_of(self, row: Row) -> float:
        """The merge key of ``row`` (taken next from this file): its timestamp, or the previous row's
        key when it has none or an unparseable one."""
        value = row.get(self.timestamp_column)
        try:
            ts = parse_timestamp(value) if isinstance(value, str) else None
        except DecodeError:
            ts = None
        if ts is not None:
            self.last_key = ts
        return self.last_key

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class CsvSource:
    """Replays ``paths`` (rows merged in timestamp order) as one partition, 0; ``replayable``.

    - ``stream_column``: the column naming each row's stream (``Message.key = None``); default: each
      file is one stream named by its stem (``Message.key = stem``).
    - ``timestamp_column``: the merge order's column (seconds or ISO-8601 text, as the decoder reads it).
    - ``speed``: ``None`` replays as fast as possible; else at ``speed`` times real pace (gaps between
      consecutive rows' timestamps are slept, divided by ``speed``; a gap backwards is not slept).
    - ``delimiter``: the field separator.

    ``Message.position`` is the row's global sequence number in emission order (0, 1, ...),
    ``Message.topic`` its file's path; ``positions()`` is ``{"rows": {path: rows emitted from it}}``.
    """

    guarantee: Guarantee = "replayable"

    def __init__(
        self,
        paths: list[str | Path],
        stream_column: str | None = None,
        timestamp_column: str = "timestamp",
        speed: float | None = None,
        delimiter: str = ",",
    ) -> None:
        if not paths:
            raise ValueError("CSV source: no files given")
        if speed is not None and not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a positive number of times real pace, got {speed!r}")
        self.paths = [Path(p) for p in paths]
        names = [str(p) for p in self.paths]
        if len(set(names)) != len(names):
            raise ValueError(f"CSV source: a file is listed twice in {names}")
        stems = [p.stem for p in self.paths]
        if stream_column is None and len(set(stems)) != len(stems):
            raise ValueError(f"CSV source: files {names} share a name; their streams would be one")
        self.stream_column = stream_column
        self.timestamp_column = timestamp_column
        self.speed = speed
        self.delimiter = delimiter
        self._files: list[_File] = []
        self._heap: list[tuple[float, int, int, Row]] = []  # (key, file index, row number, row)
        self._sequence = 0
        self._committed: dict[str, int] = {}
        self._opened = False
        self._pace: tuple[float, float] | None = None  # (wall anchor, timestamp anchor)
        self._last_ts = -math.inf

    # ---- Source --------------------------------------------------------------------------------------
    def open(self, assignment: Assignment, resume: Mapping[str, Any]) -> None:
        """Open every file (``OSError`` naming the file when one cannot be read), skip the rows counted
        in ``resume`` (``positions()`` of a previous run) and announce partition 0."""
        self._committed = _rows_of(resume, [str(p) for p in self.paths])
        self._start(self._committed)
        self._opened = True
        assignment.assigned([0])

    def poll(self, timeout_s: float) -> list[Message]:
        """The rows due now, at most ``MAX_BATCH``; waits up to ``timeout_s`` seconds when none is."""
        if not self._heap:
            return []
        if self.speed is None:
            return self._take(MAX_BATCH, math.inf)
        now = time.monotonic()
        wait = self._due(self._heap[0][0]) - now
        if wait > 0:
            time.sleep(min(wait, max(timeout_s, 0.0)))
            now = time.monotonic()
        return self._take(MAX_BATCH, now)

    @property
    def exhausted(self) -> bool:
        return self._opened and not self._heap

    def positions(self) -> dict[str, Any]:
        return {"rows": {f.name: f.rows for f in self._files}}

    def commit(self) -> None:
        """Nothing to acknowledge; remembers the positions for ``rollback``."""
        self._committed = {f.name: f.rows for f in self._files}

    def rollback(self) -> list[int]:
        """Reopen the files at the positions of the last ``commit`` (or of ``open``)."""
        self._close_files()
        self._start(self._committed)
        return [0]

    def close(self) -> None:
        self._close_files()

    # ---- merging -------------------------------------------------------------------------------------
    def _start(self, skip: Mapping[str, int]) -> None:
        """Open the files, skip ``skip[path]`` rows of each and fill the merge heap."""
        self._files, self._heap, self._pace, self._last_ts = [], [], None, -math.inf
        try:
            for i, path in enumerate(self.paths):
                self._files.append(_File(path, i, self.delimiter, self.timestamp_column))
        except OSError:
            self._close_files()
            raise
        for f in self._files:
            for _ in range(skip.get(f.name, 0)):
                row = f.next_row()
                if row is None:
                    break
                f.key_of(row)
                f.rows += 1
            self._push(f)
        self._sequence = sum(f.rows for f in self._files)

    def _push(self, f: _File) -> None:
        row = f.next_row()
        if row is not None:
            # one file replayed as fast as possible needs no merge key: skip parsing its timestamp
            key = f.key_of(row) if len(self._files) > 1 or self.speed is not None else 0.0
            heapq.heappush(self._heap, (key, f.index, f.rows, row))

    def _take(self, limit: int, until: float) -> list[Message]:
        """Pop up to ``limit`` rows due by ``until`` (monotonic seconds) as messages."""
        out: list[Message] = []
        heap, files = self._heap, self._files
        now = time.monotonic()
        while heap and len(out) < limit:
            key = heap[0][0]
            if self.speed is not None and self._due(key) > until:
                break
            _, index, _, row = heapq.heappop(heap)
            f = files[index]
            self._advance_pace(key)
            key_id = None if self.stream_column is not None else f.path.stem
            out.append(Message(row, key_id, 0, self._sequence, f.name, now))
            self._sequence += 1
            f.rows += 1
            self._push(f)
        return out

    # ---- pacing --------------------------------------------------------------------------------------
    def _due(self, key: float) -> float:
        """When (monotonic seconds) a row of merge key ``key`` is due at ``speed`` times real pace:
        at once for the first row, a row without a timestamp, or a step backwards in time."""
        if self._pace is None or key <= self._last_ts or not math.isfinite(key):
            return -math.inf
        return self._scheduled(key)

    def _scheduled(self, key: float) -> float:
        assert self._pace is not None and self.speed is not None
        wall, ts = self._pace
        return wall + (key - ts) / self.speed

    def _advance_pace(self, key: float) -> None:
        """Note the emitted row's key: anchor the pace at the first row, and again after a step
        backwards (the gap measured from then on starts at the time the previous row was due)."""
        if self.speed is None or not math.isfinite(key):
            return
        if self._pace is None:
            self._pace = (time.monotonic(), key)
        elif key < self._last_ts:
            self._pace = (self._scheduled(self._last_ts), key)
        self._last_ts = key

    def _close_files(self) -> None:
        for f in self._files:
            f.close()


def _rows_of(resume: Mapping[str, Any], names: list[str]) -> dict[str, int]:
    """The per-file row counts in ``resume`` (``{"rows": {path: count}}``; empty on a first run)."""
    rows = resume.get("rows", {}) if resume else {}
    if not isinstance(rows, Mapping) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in rows.values()
    ):
        raise ValueError(f"CSV source: resume positions must be {{'rows': {{path: count}}}}, got {resume!r}")
    unknown = set(rows) - set(names)
    if unknown:
        log.warning("CSV source: resume positions name files not replayed now: %s", sorted(unknown))
    return {str(k): v for k, v in rows.items() if k in names}
