"""How a long-running process logs and ends (``rnnstream.process``): repeated log lines are limited, and
a fatal error ends ``rnnstream run`` promptly with status 1 even when a thread that is not a daemon
would keep it alive."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from rnnstream.process import RepeatLimit

REPO = Path(__file__).resolve().parents[2]


def _record(msg: str, exc: type[BaseException] | None = None) -> logging.LogRecord:
    info = (exc, exc("boom"), None) if exc else None
    return logging.LogRecord("kafka.producer", logging.ERROR, __file__, 1, msg, None, info)


def test_an_error_repeated_in_a_loop_is_logged_a_few_times_then_summarised(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    limit = RepeatLimit(burst=3, window_s=60)
    passed = sum(limit.filter(_record("batch %s not in deque", ValueError)) for _ in range(10_000))
    assert passed == 3
    assert limit.filter(_record("another message"))  # other kinds are not affected
    clock[0] = 61.0
    record = _record("batch %s not in deque", ValueError)
    assert limit.filter(record) and "[9997 more like this in the last 60 s]" in record.msg


def test_a_fatal_error_ends_the_run_promptly_despite_a_thread_that_never_stops(tmp_path):
    """A pipeline whose sink cannot write (``/dev/full``: every flush fails with ENOSPC, even for root),
    in a process where a library thread that is not a daemon loops forever (as kafka-python's producer
    thread did): exit status 1 within ``FATAL_EXIT_S`` (10 s) of the error, not never."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {REPO / 'models/assets/sensor_lstm.safetensors'}\n"
        f"source: {{type: csv, paths: [{REPO / 'configs/data/machines.csv'}], stream_column: machine,"
        " channels: [value]}\n"
        "sink: {type: jsonl, path: /dev/full}\n"
    )
    script = (
        "import threading, time\n"
        "threading.Thread(target=lambda: [time.sleep(0.01) for _ in iter(int, 1)], daemon=False).start()\n"
        "from rnnstream.cli import app\n"
        f"app(['run', {str(config)!r}])\n"
    )
    started = time.monotonic()
    argv = [sys.executable, "-c", script]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "fatal: OSError" in proc.stderr and "exiting with 1" in proc.stderr, proc.stderr[-2000:]
    assert took < 40, took


def test_log_json_writes_one_json_object_per_line(tmp_path):
    import json

    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {REPO / 'models/assets/sensor_lstm.safetensors'}\n"
        f"source: {{type: csv, paths: [{REPO / 'configs/data/machines.csv'}], stream_column: machine,"
        " channels: [value]}\n"
        "sink: {type: 'null'}\n"
    )
    argv = [sys.executable, "-m", "rnnstream.cli", "run", str(config), "--log-json"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert logged and all({"ts", "level", "logger", "message"} <= set(doc) for doc in logged)
    assert any("assigned partitions" in doc["message"] for doc in logged)
