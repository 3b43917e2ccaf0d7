"""The admin endpoint over real HTTP: Prometheus metrics, JSON stats, and fine-tuning control from the
``rnnstream finetune`` commands."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from engine import Engine
from engine.finetune import FineTuneSettings
from models.stream_model import ModelSpec, StreamModel
from rnnstream.admin import AdminServer, call_admin
from rnnstream.cli import app

runner = CliRunner()


def _metrics(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture()
def engine():
    model = StreamModel(ModelSpec("gru", 1, 8, head="regression", head_out=1))
    with Engine(model, device="cpu") as eng:
        yield eng


def test_metrics_and_stats_come_from_the_engine(engine):
    admin = AdminServer(engine, port=0, extra=lambda: {"dead_letters": 3.0})
    try:
        engine.step_many(["a", "b", "a"], np.zeros((3, 1), np.float32))
        metrics = _metrics(admin.address)
        assert metrics["rnnstream_events_total"] == 3.0
        assert metrics["rnnstream_active_streams"] == 2.0
        assert metrics["rnnstream_dead_letters_total"] == 3.0
        assert "rnnstream_finetune_updates_total" not in metrics
        stats = call_admin(admin.address, "/stats")
        assert stats["events"] == 3 and stats["service"] == {"dead_letters": 3.0}
        with pytest.raises(RuntimeError, match="not enabled"):
            call_admin(admin.address, "/finetune/pause", post=True)
        with pytest.raises(RuntimeError, match="no such endpoint"):
            call_admin(admin.address, "/nothing")
    finally:
        admin.close()


def test_finetune_is_paused_resumed_and_stopped_from_the_cli(engine):
    tuner = engine.start_finetuning(FineTuneSettings(k1=2, k2=4, isolation="thread"))
    admin = AdminServer(engine, port=0)
    try:
        env = {"COLUMNS": "200"}
        result = runner.invoke(app, ["finetune", "pause", "--admin", admin.address], env=env)
        assert result.exit_code == 0, result.output
        assert tuner.paused and "paused" in result.output
        assert _metrics(admin.address)["rnnstream_finetune_paused"] == 1.0
        result = runner.invoke(app, ["finetune", "resume", "--admin", admin.address], env=env)
        assert result.exit_code == 0 and not tuner.paused
        result = runner.invoke(app, ["finetune", "status", "--admin", admin.address], env=env)
        assert result.exit_code == 0 and "serving_version" in result.output
        result = runner.invoke(app, ["finetune", "stop", "--admin", admin.address], env=env)
        assert result.exit_code == 0 and tuner.stats().state == "stopped"
        metrics = _metrics(admin.address)
        assert metrics["rnnstream_finetune_updates_total"] == tuner.stats().updates
    finally:
        admin.close()
    # Nothing listening: a clear error and exit status 1.
    time.sleep(0.1)
    result = runner.invoke(app, ["finetune", "status", "--admin", admin.address])
    assert result.exit_code == 1


def _get(address: str, path: str) -> tuple[int, dict]:
    import json
    import urllib.error

    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_endpoints_follow_the_engine_loop(engine):
    admin = AdminServer(engine)
    try:
        assert _get(admin.address, "/healthz")[0] == 200 and _get(admin.address, "/readyz")[0] == 200
        engine.close()  # the step loop stops
        code, body = _get(admin.address, "/healthz")
        assert code == 503 and body["reasons"] == ["the step loop is not running"]
    finally:
        admin.close()


def test_a_running_pipeline_is_scraped_alive_and_ready_then_not_when_its_loop_stalls(tmp_path):
    """A pipeline serving ``health()`` on the admin endpoint, scraped over real HTTP: not ready before
    its source opens, alive and ready while it consumes; a source that blocks past ``STALL_S`` makes
    ``/healthz`` and ``/readyz`` fail with the reason."""
    import threading

    from connectors.base import Message
    from connectors.codec import Decoder, KeyedDecoder
    from rnnstream import pipeline as pl
    from rnnstream.checkpoint import EphemeralState

    class Blocking:
        guarantee = "best-effort"
        exhausted = False

        def __init__(self) -> None:
            self.release = threading.Event()
            self.polls = 0

        def open(self, assignment, resume) -> None:
            assignment.assigned([0])

        def poll(self, timeout_s: float) -> list[Message]:
            self.polls += 1
            if self.polls > 20:
                self.release.wait()  # a source stuck in a library call
            time.sleep(0.01)
            return [Message(b'{"x": [0.5]}', b"s", 0, self.polls)]

        def positions(self) -> dict:
            return {}

        def commit(self) -> None:
            pass

        def rollback(self) -> list[int]:
            return [0]

        def close(self) -> None:
            self.release.set()

    class Null:
        def write(self, item) -> None:
            pass

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    model = StreamModel(ModelSpec("gru", 1, 8, head="regression", head_out=1))
    source = Blocking()
    p = pl.Pipeline(
        Engine(model, device="cpu"),
        source,
        KeyedDecoder(Decoder("json", 1)),
        Null(),
        Null(),
        EphemeralState(),
    )
    admin = AdminServer(p.engine, health=p.health)
    assert _get(admin.address, "/readyz")[0] == 503  # not open yet
    old, pl.STALL_S = pl.STALL_S, 0.5
    thread = threading.Thread(target=p.run, daemon=True)
    thread.start()
    try:
        time.sleep(0.1)
        assert _get(admin.address, "/healthz")[0] == 200
        code, body = _get(admin.address, "/readyz")
        assert code == 200 and body["ready"], body
        time.sleep(1.0)  # the source is stuck now
        code, body = _get(admin.address, "/healthz")
        assert code == 503 and "has not gone round" in body["reasons"][0], body
        assert _get(admin.address, "/readyz")[0] == 503
    finally:
        pl.STALL_S = old
        p.stop()
        source.release.set()
        thread.join(10)
        admin.close()


def test_limits_reached_show_in_the_metrics():
    model = StreamModel(ModelSpec("gru", 1, 8, head="regression", head_out=1))
    with Engine(model, device="cpu", max_streams=2) as eng:
        admin = AdminServer(eng, port=0)
        try:
            eng.step_many(["a", "b"], np.zeros((2, 1), np.float32))
            eng.step_many(["c"], np.zeros((1, 1), np.float32))  # evicts the least recently used
            assert eng.admit(["d", "e", "f"]) == ["f"]  # one call: "d" and "e" fit by evicting, "f" not
            metrics = _metrics(admin.address)
            assert metrics["rnnstream_evictions_for_capacity_total"] == 3.0
            assert metrics["rnnstream_evictions_total"] == 3.0
            assert metrics["rnnstream_refused_streams_total"] == 1.0
            assert metrics["rnnstream_capacity"] >= 2.0
        finally:
            admin.close()


def test_a_service_counter_named_like_an_engine_metric_does_not_repeat_its_name(engine):
    admin = AdminServer(engine, port=0, extra=lambda: {"events": 5.0, "outputs": 2.0})
    try:
        engine.step_many(["a"], np.zeros((1, 1), np.float32))
        with urllib.request.urlopen(f"http://{admin.address}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
        assert len(names) == len(set(names))  # Prometheus refuses a scrape that repeats a family
        metrics = _metrics(admin.address)
        assert metrics["rnnstream_events_total"] == 1.0
        assert metrics["rnnstream_service_events_total"] == 5.0
        assert metrics["rnnstream_outputs_total"] == 2.0
    finally:
        admin.close()
