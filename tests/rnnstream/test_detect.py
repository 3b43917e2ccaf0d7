"""``rnnstream nab`` end to end on a small NAB-shaped corpus made here (the shared one is for the
detector's own evaluation)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta

import numpy as np
from typer.testing import CliRunner

from rnnstream.cli import app
from rnnstream.detect import nab

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
