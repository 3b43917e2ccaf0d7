"""The admin endpoint of the Kafka service, scraped over real HTTP (``urllib``) while it runs against the
real broker: ``/metrics`` parsed as Prometheus text (``prometheus_client``'s parser) with counters equal
to what was produced, ``/healthz`` alive, ``/readyz`` ready once the partitions are restored, also after a
restart that restores the checkpointed streams."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    """``GET url`` → (status, body); an error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metrics(address: str) -> dict[str, float]:
    """``/metrics`` as ``{sample name: value}``, through the Prometheus text parser."""
    status, body = _get(f"http://{address}/metrics")
    assert status == 200
    families = text_string_to_metric_families(body.decode())
    return {s.name: s.value for family in families for s in family.samples}


def _until_ready(address: str, run, timeout_s: float = 90) -> dict:
    """Scrape ``/readyz`` until it answers 200 (connection refused while the process starts); the body."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in run.procs.items():
            assert proc.poll() is None, f"service {name} exited {proc.returncode}:\n{run.log(name)[-3000:]}"
        try:
            status, body = _get(f"http://{address}/readyz")
        except OSError:  # not listening yet
            status, body = 0, b""
        if status == 200:
            return json.loads(body)
        time.sleep(0.1)
    raise AssertionError(f"/readyz never answered 200:\n{run.log()[-3000:]}")


def _until(address: str, name: str, value: float, timeout_s: float = 90) -> dict[str, float]:
    """Scrape ``/metrics`` until sample ``name`` reaches ``value``; the last scrape."""
    deadline = time.monotonic() + timeout_s
    metrics = _metrics(address)
    while metrics.get(name, -1) < value and time.monotonic() < deadline:
        time.sleep(0.2)
        metrics = _metrics(address)
    return metrics


def _events(rng: np.random.Generator, streams: list[str], n: int) -> list[tuple[bytes, bytes]]:
    ids = rng.integers(0, len(streams), n)
    return [(streams[i].encode(), json.dumps({"x": rng.standard_normal(3).tolist()}).encode()) for i in ids]


def test_metrics_and_health_scraped_during_a_kafka_run_follow_what_was_produced(service, kafka_helpers):
    h = kafka_helpers
    port = _free_port()
    address = f"127.0.0.1:{port}"
    service.extra = {"metrics_port": port}
    rng = np.random.default_rng(7)
    streams = [f"dev-{i}" for i in range(10)]
    first = _events(rng, streams, 300)
    h.produce(service.bootstrap, service.topic, first)
    service.start()

    health = _until_ready(address, service)
    assert health["ready"] and health["alive"] and health["reasons"] == []
    metrics = _until(address, "rnnstream_messages_total", len(first))
    assert metrics["rnnstream_messages_total"] == len(first)
    assert metrics["rnnstream_events_total"] == len(first)  # one timestep each
    assert metrics["rnnstream_active_streams"] == len({k for k, _ in first})
    assert metrics["rnnstream_dead_letters_total"] == 0
    assert metrics["rnnstream_restored_streams_total"] == 0  # a fresh group: nothing to restore
    assert len(service.consume(service.outputs_topic, len(first))) == len(first)
    assert _metrics(address)["rnnstream_checkpoints_total"] >= 1

    # More while it runs: data, two malformed messages, two streams ended.
    second = _events(rng, streams, 200)
    bad = [(b"dev-0", b"{not json"), (b"dev-1", json.dumps({"x": [1.0, 2.0]}).encode())]
    ends = [(s.encode(), json.dumps({"control": "end"}).encode()) for s in streams[:2]]
    h.produce(service.bootstrap, service.topic, second + bad + ends)
    total = len(first) + len(second) + len(bad) + len(ends)
    metrics = _until(address, "rnnstream_messages_total", total)
    assert metrics["rnnstream_messages_total"] == total
    assert metrics["rnnstream_events_total"] == len(first) + len(second)
    assert metrics["rnnstream_dead_letters_total"] == len(bad)
    assert metrics["rnnstream_active_streams"] == len(streams) - len(ends)
    assert metrics["rnnstream_outputs_total"] == len(first) + len(second) + len(ends)
    assert _get(f"http://{address}/healthz")[0] == 200
    assert len(service.consume(service.outputs_topic, total - len(bad))) == total - len(bad)
    assert service.terminate() == 0, service.log()[-3000:]

    # A restart restores the checkpointed streams and is ready; nothing is applied twice.
    service.start()
    health = _until_ready(address, service)
    assert health["ready"], health
    live = len(streams) - len(ends)
    metrics = _until(address, "rnnstream_active_streams", live)  # a rebalance may drop and restore again
    assert metrics["rnnstream_active_streams"] == live
    assert metrics["rnnstream_restored_streams_total"] >= live
    assert metrics["rnnstream_messages_total"] == 0  # restored from the changelog, not replayed
    assert _get(f"http://{address}/readyz")[0] == 200
    third = _events(rng, streams[2:], 50)
    h.produce(service.bootstrap, service.topic, third)
    metrics = _until(address, "rnnstream_messages_total", len(third))
    assert metrics["rnnstream_messages_total"] == len(third)  # not the earlier ones again
    assert metrics["rnnstream_events_total"] == len(third)
    assert service.terminate() == 0, service.log()[-3000:]
