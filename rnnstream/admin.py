"""The admin endpoint of a running rnnstream process (``rnnstream run``, ``rnnstream demo``).

HTTP on ``127.0.0.1:PORT`` by default:

- ``GET /metrics``: Prometheus text format (engine counters, latency, fine-tuning progress, and any extra
  counters the service registers), read from ``Engine.stats()`` at scrape time, so the hot path pays
  nothing;
- ``GET /stats``: the same as JSON;
- ``GET /healthz`` (alive: 200, else 503) and ``GET /readyz`` (ready to serve: state restored, consuming,
  loops running: 200, else 503), with ``{"alive", "ready", "reasons"}``: from the pipeline's ``health()``
  when it serves one, else from the engine's step loop;
- ``POST /finetune/pause``, ``/finetune/resume``, ``/finetune/stop``: control the fine-tuning worker
  (``rnnstream finetune pause|resume|stop|status --admin HOST:PORT`` calls these).
"""

from __future__ import annotations

import json
import math
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.engine import Engine

ExtraCounters = Callable[[], dict[str, float]]

_ENGINE_COUNTERS = {
    "events": "events applied",
    "batches": "batches run",
    "steps": "fused steps run",
    "errors": "events failed",
    "loop_errors": "step-loop failures outside any one event (the loop went on)",
    "evictions": "streams evicted (idle past the TTL, or for capacity)",
    "evictions_for_capacity": "streams evicted to make room under max_streams/max_state_bytes",
    "refused_streams": "new streams refused a slot (a limit reached, nothing evictable)",
}
_ENGINE_GAUGES = {
    "active_streams": "streams held in memory",
    "spilled_streams": "streams spilled to disk",
    "pending": "events queued",
    "state_bytes": "bytes of state tensors",
    "capacity": "stream slots allocated",
    "latency_p50_ms": "submit→result p50 (recent events)",
    "latency_p99_ms": "submit→result p99 (recent events)",
    "model_version": "serving weights",
}
_FINETUNE_COUNTERS = {
    "rounds": "training rounds",
    "updates": "TBPTT updates",
    "skipped_updates": "updates skipped (non-finite)",
    "published": "versions published",
    "rolled_back": "versions rolled back",
}
_FINETUNE_GAUGES = {
    "train_loss": "mean training loss, last round",
    "val_loss_serving": "validation loss of the serving weights",
    "val_loss_candidate": "validation loss of the candidate",
    "updates_per_s": "updates per second",
}


class EngineCollector(Collector):
    """Prometheus metrics from ``engine.stats()`` (and ``extra()`` counters), computed per scrape."""

    def __init__(self, engine: Engine, extra: ExtraCounters | None = None) -> None:
        self.engine = engine
        self.extra = extra

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.engine.stats().as_dict()
        yield from _families("rnnstream", stats, _ENGINE_COUNTERS, _ENGINE_GAUGES)
        finetune = stats.get("finetune")
        if finetune:
            yield from _families("rnnstream_finetune", finetune, _FINETUNE_COUNTERS, _FINETUNE_GAUGES)
            paused = GaugeMetricFamily("rnnstream_finetune_paused", "1 while the worker is paused")
            paused.add_metric([], float(finetune["state"] == "paused"))
            yield paused
        taken = set(_ENGINE_COUNTERS) | set(_ENGINE_GAUGES)
        for name, value in (self.extra() if self.extra else {}).items():
            metric = f"rnnstream_{name}" if name not in taken else f"rnnstream_service_{name}"
            yield CounterMetricFamily(metric, name.replace("_", " "), value=value)


def _families(
    prefix: str, values: dict[str, Any], counters: dict[str, str], gauges: dict[str, str]
) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    for key, doc in counters.items():
        yield CounterMetricFamily(f"{prefix}_{key}", doc, value=float(values[key]))
    for key, doc in gauges.items():
        value = float(values[key])
        yield GaugeMetricFamily(f"{prefix}_{key}", doc, value=value if math.isfinite(value) else math.nan)


class AdminServer:
    """Serves the endpoints above from a daemon thread; ``close()`` stops it. ``port=0`` picks a free
    port (``self.port`` tells which)."""

    def __init__(
        self,
        engine: Engine,
        port: int = 0,
        host: str = "127.0.0.1",
        extra: ExtraCounters | None = None,
        health: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.engine = engine
        self.health = health or self._engine_health
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, extra))
        self.extra = extra
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="rnnstream-admin", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def stats(self) -> dict[str, Any]:
        stats = self.engine.stats().as_dict()
        if self.extra is not None:
            stats["service"] = self.extra()
        return stats

    def _engine_health(self) -> dict[str, Any]:
        alive = self.engine.loop_alive
        return {"alive": alive, "ready": alive, "reasons": [] if alive else ["the step loop is not running"]}

    def finetune(self, action: str) -> dict[str, Any]:
        tuner = self.engine.finetuner
        if tuner is None:
            raise LookupError("fine-tuning is not enabled in this process")
        if action not in ("pause", "resume", "stop"):
            raise ValueError(f"unknown action {action!r}")
        getattr(tuner, action)()
        return tuner.stats().as_dict()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._reply(200, generate_latest(admin.registry), "text/plain; version=0.0.4")
                elif self.path == "/stats":
                    self._json(200, admin.stats())
                elif self.path in ("/healthz", "/readyz"):
                    health = admin.health()
                    ok = health["alive"] if self.path == "/healthz" else health["ready"]
                    self._json(200 if ok else 503, health)
                else:
                    self._json(404, {"error": f"no such endpoint {self.path}"})

            def do_POST(self) -> None:
                parts = self.path.strip("/").split("/")
                if len(parts) != 2 or parts[0] != "finetune":
                    self._json(404, {"error": f"no such endpoint {self.path}"})
                    return
                try:
                    self._json(200, admin.finetune(parts[1]))
                except LookupError as exc:
                    self._json(409, {"error": str(exc)})
                except ValueError as exc:
                    self._json(404, {"error": str(exc)})

            def _json(self, code: int, body: Any) -> None:
                self._reply(code, json.dumps(body, default=str).encode(), "application/json")

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def call_admin(address: str, path: str, post: bool = False, timeout_s: float = 10.0) -> dict[str, Any]:
    """Call a running process's admin endpoint (``address``: ``HOST:PORT``); returns the JSON reply.
    Raises ``RuntimeError`` with the server's reason on an error status."""
    url = f"http://{address}/{path.lstrip('/')}"
    request = urllib.request.Request(url, method="POST" if post else "GET", data=b"" if post else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        reason = json.loads(exc.read() or b"{}").get("error", exc.reason)
        raise RuntimeError(f"{url}: {reason}") from exc
