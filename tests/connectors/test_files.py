"""Sinks and dead letters on local files: JSON lines, CSV with a header, appends, odd raw input."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from connectors.base import DeadLetter, DeadLetters, Message, Output, Sink
from connectors.files import CsvSink, JsonLinesDeadLetters, JsonLinesSink, NullSink, StdoutSink


def outputs(n: int = 2, start: int = 0) -> list[Output]:
    return [
        Output(
            f"s{i}",
            {"y": np.array([[0.5, -1.0]], np.float32), "offset": i, "score": np.float32(0.25), "flag": None},
            0,
            i,
        )
        for i in range(start, start + n)
    ]


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ---- JSON lines ------------------------------------------------------------------------------------
def test_stdout_sink_writes_one_json_line_per_output():
    stream = io.StringIO()
    sink = StdoutSink(stream)
    assert isinstance(sink, Sink)
    sink.write(outputs(2))
    sink.flush()
    lines = stream.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"stream": "s0", "y": [[0.5, -1.0]], "offset": 0, "score": 0.25, "flag": None},
        {"stream": "s1", "y": [[0.5, -1.0]], "offset": 1, "score": 0.25, "flag": None},
    ]
    sink.close()
    assert not stream.closed  # not ours to close


def test_stdout_sink_flush_flushes_the_stream():
    class Stream(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    stream = Stream()
    sink = StdoutSink(stream)
    sink.write(outputs(1))
    assert stream.flushes == 0
    sink.flush()
    assert stream.flushes == 1


def test_stdout_sink_defaults_to_stdout(capsys):
    sink = StdoutSink()
    sink.write(outputs(1))
    sink.flush()
    assert json.loads(capsys.readouterr().out)["stream"] == "s0"


def test_json_lines_sink_appends(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = JsonLinesSink(path)
    sink.write(outputs(2))
    sink.flush()
    assert [d["stream"] for d in json_lines(path)] == ["s0", "s1"]  # visible after flush, before close
    sink.close()
    again = JsonLinesSink(path)
    again.write(outputs(1, start=2))
    again.close()
    again.close()
    assert [d["offset"] for d in json_lines(path)] == [0, 1, 2]


def test_null_sink_counts():
    sink = NullSink()
    sink.write(outputs(3))
    sink.write([])
    sink.flush()
    sink.close()
    assert sink.outputs == 3 and sink.writes == 2


# ---- CSV -------------------------------------------------------------------------------------------
def test_csv_sink_header_from_the_first_document(tmp_path):
    path = tmp_path / "out.csv"
    sink = CsvSink(path)
    sink.write([])
    sink.write(outputs(2))
    sink.write([Output("s9", {"offset": 9, "extra": "dropped"})])
    sink.flush()
    rows = csv_rows(path)
    sink.close()
    assert rows[0] == ["stream", "y", "offset", "score", "flag"]
    assert rows[1] == ["s0", "[[0.5,-1.0]]", "0", "0.25", ""]  # arrays as JSON text, None empty
    assert json.loads(rows[2][1]) == [[0.5, -1.0]]
    assert rows[3] == ["s9", "", "9", "", ""]  # missing keys empty, unknown ones dropped
    assert len(rows) == 4


def test_csv_sink_appends_without_a_second_header(tmp_path):
    path = tmp_path / "out.csv"
    first = CsvSink(path)
    first.write(outputs(1))
    first.close()
    second = CsvSink(path)  # takes the existing header as its columns
    second.write([Output("s5", {"score": 1.5, "offset": 5, "new": 1})])
    second.close()
    rows = csv_rows(path)
    assert rows[0] == ["stream", "y", "offset", "score", "flag"] and rows.count(rows[0]) == 1
    assert rows[2] == ["s5", "", "5", "1.5", ""]


def test_csv_sink_explicit_columns(tmp_path):
    path = tmp_path / "out.csv"
    sink = CsvSink(path, columns=["offset", "stream", "y"])
    sink.close()
    assert path.read_text() == ""  # nothing written: no header yet
    sink = CsvSink(path, columns=["offset", "stream", "y"])
    sink.write(outputs(1))
    sink.close()
    assert csv_rows(path) == [["offset", "stream", "y"], ["0", "s0", "[[0.5,-1.0]]"]]
    with pytest.raises(ValueError, match="has columns"):
        CsvSink(path, columns=["stream", "offset"])


# ---- dead letters ----------------------------------------------------------------------------------
def letter(raw, key=b"k1", position=7) -> DeadLetter:
    return DeadLetter(raw, "channel 'value': not a number", key, "in.csv", 0, position, ts=1700000000.5)


def test_dead_letters_as_json_lines(tmp_path):
    path = tmp_path / "dead.jsonl"
    dead = JsonLinesDeadLetters(path)
    assert isinstance(dead, DeadLetters)
    dead.write(letter(b"1,abc"))
    dead.write(letter(b"\xff\xfe\x00junk", key=b"\xff"))
    dead.write(letter({"timestamp": "1", "value": "x", None: ["extra"]}, key="pump"))
    dead.write(letter("1,\ud800", key=None, position=None))
    dead.write(DeadLetter.of(Message(b'{"value": 1}', "s", 0, 3, "topic"), "missing stream"))
    dead.flush()
    records = json_lines(path)
    assert records[0] == {
        "reason": "channel 'value': not a number",
        "key": "k1",
        "topic": "in.csv",
        "partition": 0,
        "position": 7,
        "ts": 1700000000.5,
        "raw": "1,abc",
    }
    assert base64.b64decode(records[1]["raw"]["base64"]) == b"\xff\xfe\x00junk"
    assert base64.b64decode(records[1]["key"]["base64"]) == b"\xff"
    assert (
        records[2]["raw"] == {"timestamp": "1", "value": "x", "null": ["extra"]}
        and records[2]["key"] == "pump"
    )
    assert records[3]["raw"] == "1,\\ud800" and records[3]["position"] is None
    assert records[4]["raw"] == '{"value": 1}' and records[4]["position"] == 3
    dead.close()
    again = JsonLinesDeadLetters(path)
    again.write(letter(b"more"))
    again.close()
    assert len(json_lines(path)) == 6


def test_dead_letters_of_odd_values(tmp_path):
    path = tmp_path / "dead.jsonl"
    dead = JsonLinesDeadLetters(path)
    dead.write(letter(bytearray(b"ok"), position=2**70))
    dead.write(letter(object()))
    dead.write(letter(np.array([1.5, np.nan])))
    dead.close()
    records = json_lines(path)
    assert records[0]["raw"] == "ok" and records[0]["position"] == str(2**70)
    assert records[1]["raw"].startswith("<object")
    assert records[2]["raw"] == [1.5, None]


def test_dead_letters_to_stderr(capsys):
    dead = JsonLinesDeadLetters("-")
    dead.write(letter(b"1,abc"))
    dead.close()
    assert json.loads(capsys.readouterr().err)["raw"] == "1,abc"
