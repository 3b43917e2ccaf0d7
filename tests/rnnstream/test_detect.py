"""``rnnstream detect`` (row alignment, plots, messy files, errors) and ``rnnstream nab`` end to end on a
small NAB-shaped corpus made here (the shared one is for the detector's own evaluation)."""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from typer.testing import CliRunner

from rnnstream.cli import app
from rnnstream.detect import load_windows, nab, windows_for

START = datetime(2020, 1, 1, tzinfo=UTC)


def _corpus(tmp_path):
    """Two files of 600 readings (5 min apart), each with one spike in the middle of a labelled window."""
    rng = np.random.default_rng(0)
    data, labels = tmp_path / "data", {}
    for k, spike in enumerate((400, 480)):
        folder = data / f"cat{k}"
        folder.mkdir(parents=True)
        values = 10 + 3 * np.sin(np.arange(600) * 2 * np.pi / 48) + rng.normal(0, 0.1, 600)
        values[spike] += 15
        stamps = [START + timedelta(minutes=5 * i) for i in range(600)]
        with open(folder / f"file{k}.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["timestamp", "value"])
            out.writerows(
                [t.strftime("%Y-%m-%d %H:%M:%S"), f"{v:.4f}"] for t, v in zip(stamps, values, strict=True)
            )
        window = [
            stamps[spike - 20].strftime("%Y-%m-%d %H:%M:%S.%f"),
            stamps[spike + 20].strftime("%Y-%m-%d %H:%M:%S.%f"),
        ]
        labels[f"cat{k}/file{k}.csv"] = [window]
    path = tmp_path / "combined_windows.json"
    path.write_text(json.dumps(labels))
    return data, path


def test_nab_scores_a_detector_that_catches_obvious_spikes(tmp_path):
    data, labels = _corpus(tmp_path)
    report = nab(data, labels)
    assert report.files == 2 and report.rows == 1200
    standard = report.profiles["standard"]
    assert standard.windows == 2 and standard.windows_hit == 2
    assert standard.score > 60, (
        standard
    )  # both spikes, caught in their windows' second half, few false alarms
    assert 0 <= report.profiles["reward_low_FP"].score <= 100 and report.seconds > 0


def test_nab_command_prints_the_three_profiles(tmp_path):
    data, labels = _corpus(tmp_path)
    result = CliRunner().invoke(
        app, ["nab", "--data", str(data), "--labels", str(labels)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    for profile in ("standard", "reward_low_FP", "reward_low_FN"):
        assert profile in result.output
    assert "2/2" in result.output and "1,200 rows" in result.output


# ---- rnnstream detect ----------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = ["timestamp", "value"]


def _stamp(i: int, minutes: int = 5) -> str:
    return (START + timedelta(minutes=minutes * i)).strftime("%Y-%m-%d %H:%M:%S")


def _write(path, rows, header=HEADER):
    """A CSV file of ``rows`` (lists of cells) under ``header`` (``None``: no header line)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        if header is not None:
            out.writerow(header)
        out.writerows(rows)
    return path


def _spiky(n: int = 600, spike: int = 400) -> list[list[str]]:
    """A daily-ish sine (48 rows a period) with noise and one spike of +15 at row ``spike``."""
    values = 10 + 3 * np.sin(np.arange(n) * 2 * np.pi / 48) + np.random.default_rng(1).normal(0, 0.1, n)
    values[spike] += 15
    return [[_stamp(i), f"{v:.4f}"] for i, v in enumerate(values)]


# Messy inputs, each with its expected refusals: row index → a piece of the reason.
GARBAGE = [
    [_stamp(0), "1.0"],
    [_stamp(1), "2.0"],
    [],  # a blank line: not a row
    [_stamp(1), "2.0"],  # the same row again: a duplicate timestamp
    ["not a time", "3.0"],
    ["not a time", "3.0"],
    [_stamp(2), "nan"],
    ["", "5.0"],  # no timestamp
    [_stamp(0), "4.0"],  # out of order
    [_stamp(3), "abc"],
    [_stamp(3), "6.0"],  # the same timestamp as the refused row before it: scored
    [_stamp(4), "1.0", "2.0"],  # a field more than the header
    [_stamp(5)],  # no value field
    [_stamp(6), ""],
    [_stamp(7), "7.0"],
]
GARBAGE_REFUSED = {  # by data row (the blank line is none)
    2: "duplicate",
    3: "neither seconds nor",
    4: "neither seconds nor",
    5: "NaN",
    6: "no timestamp",
    7: "out of order",
    8: "not a number",
    10: "more than the header",
    11: "lacks column",
    12: "missing value",
}
MESSY = {
    "spiky": (_spiky(), {}),
    "gaps": ([[_stamp(i if i < 100 else i + 500), f"{i % 7}.5"] for i in range(200)], {}),
    "nans": (
        [[_stamp(i), "NaN" if i % 10 == 3 else f"{i % 5}"] for i in range(60)],
        {3 + 10 * k: "NaN" for k in range(6)},
    ),
    "flat": ([[_stamp(i), "42"] for i in range(300)], {}),
    "single": ([[_stamp(0), "1.5"]], {}),
    "header_only": ([], {}),
    "garbage": (GARBAGE, GARBAGE_REFUSED),
}


def _invoke(*args: str):
    return CliRunner().invoke(app, ["detect", *args], env={"COLUMNS": "200"})


def _input_rows(path) -> list[list[str]]:
    """The data rows of ``path`` as the csv module reads them (blank lines are not rows)."""
    with open(path, newline="") as f:
        return [r for r in csv.reader(f) if r][1:]


def _output(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """All the messy files (and an empty one, 0 bytes) through one ``detect`` call: (inputs, out, output)."""
    folder = tmp_path_factory.mktemp("messy")
    inputs = {name: _write(folder / f"{name}.csv", rows) for name, (rows, _) in MESSY.items()}
    inputs["empty"] = folder / "empty.csv"
    inputs["empty"].write_bytes(b"")
    out = folder / "out"
    result = _invoke(*map(str, inputs.values()), "--out", str(out))
    return inputs, out, result


def test_detect_exits_0_and_prints_a_summary_per_file(messy):
    inputs, out, result = messy
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(inputs)
    for line, name in zip(lines, inputs, strict=True):
        assert line.startswith(f"{name}: ") and str(out / f"{name}.csv") in line and f"{name}.png" in line
    assert re.search(r"garbage: 14 rows, \d+ alerts, 10 refused", result.output), result.output
    assert "empty: 0 rows" in result.output and "spiky: 600 rows, " in result.output


@pytest.mark.parametrize("name", [*MESSY, "empty"])
def test_detect_writes_exactly_the_input_rows_in_order(messy, name):
    inputs, out, _ = messy
    columns, rows = _output(out / f"{name}.csv")
    assert columns[:3] == ["timestamp", "value", "anomaly_score"] and columns[-1] == "refused"
    expected = _input_rows(inputs[name]) if name != "empty" else []
    assert [r["timestamp"] for r in rows] == [e[0] for e in expected]
    assert [r["value"] for r in rows] == [e[1] if len(e) > 1 else "" for e in expected]
    refused = MESSY.get(name, ([], {}))[1]
    for i, row in enumerate(rows):
        if i in refused:
            assert refused[i] in row["refused"] and float(row["anomaly_score"]) == 0.0, (i, row)
            assert all(row[c] == "" for c in columns[3:-1]), (i, row)  # the scorer's fields: empty
        else:
            assert row["refused"] == "" and 0.0 <= float(row["anomaly_score"]) <= 1.0, (i, row)


@pytest.mark.parametrize("name", [*MESSY, "empty"])
def test_detect_writes_a_png_per_file(messy, name):
    _, out, _ = messy
    assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


def test_an_obvious_spike_scores_higher_than_its_neighbourhood(messy):
    _, out, _ = messy
    scores = [float(r["anomaly_score"]) for r in _output(out / "spiky.csv")[1]]
    peak = max(scores[400:411])  # the spike's row, or soon after it for a scorer that smooths its errors
    assert peak > max(scores[340:400]) + 0.1 and peak > max(scores[440:500]) + 0.1, scores[390:420]


def test_no_plot_writes_no_png(tmp_path):
    path = _write(tmp_path / "few.csv", [[_stamp(i), str(i % 3)] for i in range(30)])
    result = _invoke(str(path), "--out", str(tmp_path / "out"), "--no-plot")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "few.csv").exists() and not (tmp_path / "out" / "few.png").exists()
    assert len(_output(tmp_path / "out" / "few.csv")[1]) == 30


def test_labels_shade_the_windows_of_the_matching_file(tmp_path):
    data, labels = _corpus(tmp_path)
    paths = [data / "cat0" / "file0.csv", data / "cat1" / "file1.csv"]
    result = _invoke(*map(str, paths), "--out", str(tmp_path / "out"), "--labels", str(labels))
    assert result.exit_code == 0, result.output
    for name in ("file0", "file1"):
        assert (tmp_path / "out" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    windows = load_windows(labels)
    assert windows_for(paths[1], windows) == windows["cat1/file1.csv"]
    elsewhere = _write(tmp_path / "file0.csv", [])  # not under a category folder: matched by its name
    assert windows_for(elsewhere, windows) == windows["cat0/file0.csv"]
    assert windows_for(tmp_path / "other.csv", windows) == []


def test_a_missing_file_exits_2_with_a_clear_line(tmp_path):
    present = _write(tmp_path / "present.csv", [[_stamp(0), "1"]])
    result = _invoke(str(present), str(tmp_path / "absent.csv"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert f"error: {tmp_path / 'absent.csv'}: no such file" in result.output
    assert not (tmp_path / "out").exists()


def test_two_files_of_one_name_exit_2(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [_write(tmp_path / d / "same.csv", [[_stamp(0), "1"]]) for d in ("a", "b")]
    result = _invoke(*map(str, paths), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "have one name ('same')" in result.output


def test_an_output_that_would_overwrite_its_input_exits_2(tmp_path):
    path = _write(tmp_path / "x.csv", [[_stamp(0), "1"]])
    result = _invoke(str(path), "--out", str(tmp_path))
    assert result.exit_code == 2 and "is an input" in result.output
    assert path.read_text().splitlines() == ["timestamp,value", f"{_stamp(0)},1"]


def test_unreadable_labels_exit_2(tmp_path):
    path = _write(tmp_path / "x.csv", [[_stamp(0), "1"]])
    bad = tmp_path / "labels.json"
    bad.write_text("{not json")
    result = _invoke(str(path), "--out", str(tmp_path / "out"), "--labels", str(bad))
    assert result.exit_code == 2 and "not a NAB windows file" in result.output
