"""Soak test (``python -m benchmarks.soak``): a long run of the real pipeline at a high rate, with streams
appearing and disappearing, watched from outside for leaks.

The **worker** is a subprocess (so that its RSS is its own) running ``rnnstream.pipeline.Pipeline`` with
the shipped sensor forecaster (``models/assets/sensor_lstm.safetensors``, LSTM 32), the Kafka payload
decoder (JSON ``{"x": [v]}`` / ``{"control": "end"}``), forecast scoring, a null sink, file dead letters,
a local checkpoint (``LocalCheckpoint``, every ``checkpoint_ms``), TTL eviction (``drop``) and the admin
endpoint. Its source, ``ChurnSource``, is embedded: ``live`` streams at any time, each event to a random
live stream at ``rate_hz`` messages/s in total; a stream lives for a geometric number of events (mean
``mean_life``), then either sends ``end`` (a fraction ``end_fraction``) or goes silent and is left to
the engine's TTL eviction; either way a stream with a new id takes its place. Ids are never reused.

The **watcher** (this process) samples every ``sample_s`` seconds: the worker's RSS, threads and open file
descriptors (``psutil``), its ``/stats`` over HTTP (events, active streams, slot capacity, evictions,
the pipeline's counters) and the checkpoint file's size. It writes ``soak.csv``, ``rss.png`` and
``soak.json`` and prints a table.

**Verdict** (``judge``): the first third of the run is warm-up (allocator pools, capacity doubling, the
population reaching its steady size); the second and last thirds are compared, each by its mean:

- RSS: last − second ≤ ``rss_growth_mb``; least-squares slope over both ≤ ``rss_slope_mb_h``;
- slots: active streams and slot capacity: last ≤ ``slots_ratio`` × second;
- checkpoint bytes (the rows a restart would restore): last ≤ ``slots_ratio`` × second;
- threads and open file descriptors: the last third's maximum ≤ the second third's maximum + ``fd_slack``;
- throughput: messages processed ≥ 95% of those offered (a worker falling behind hides leaks).

``--leak ended`` makes the worker keep the slot of every ended stream (``StateStore.release`` does
nothing): the control run that shows the verdict catches a leak.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
import torch
from rich.table import Table

from benchmarks.report import bench_console, publish
from connectors.base import Message
from rnnstream.admin import call_admin

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "assets" / "sensor_lstm.safetensors"
DEFAULT_OUT = Path("results/soak")
END = orjson.dumps({"control": "end"})


@dataclass(frozen=True)
class Workload:
    """What the worker runs: rates in messages/s, times in seconds."""

    rate_hz: float = 5000.0
    live: int = 2000  # streams sending at any time
    mean_life: float = 50.0  # events per stream, geometric
    end_fraction: float = 0.5  # streams that end with an 'end' control; the others go silent (TTL)
    ttl_s: float | None = 5.0  # engine eviction of idle streams (drop); None: no eviction
    checkpoint_ms: int = 1000
    max_batch: int = 2000  # messages per poll at most
    seed: int = 0
    leak: str | None = None  # 'ended': keep the slots of ended streams (control run)
    onednn_cache: int | None = None  # oneDNN's primitive cache capacity (None: its default, 1024)


@dataclass(frozen=True)
class Limits:
    """Thresholds of the verdict (see the module docstring)."""

    rss_growth_mb: float = 10.0
    rss_slope_mb_h: float = 30.0
    slots_ratio: float = 1.15
    fd_slack: int = 2
    min_processed: float = 0.95


# ---- the worker: embedded source and pipeline ------------------------------------------------------------
class ChurnSource:
    """A ``Source`` of ``live`` streams that come and go (see the module docstring). Messages are Kafka
    payloads (``connectors.codec`` JSON) keyed by stream id, one partition (0), positions counted from 0.
    ``counters()``: streams started, ended with a control, abandoned (left to the TTL)."""

    guarantee = "best-effort"
    exhausted = False

    def __init__(self, workload: Workload) -> None:
        self.w = workload
        self._rng = random.Random(workload.seed)
        self._next_id = 0
        self._live = [self._new_stream() for _ in range(workload.live)]
        self._position = 0
        self._start: float | None = None
        self.started = workload.live
        self.ended = 0
        self.abandoned = 0

    def _new_stream(self) -> list:
        """``[id bytes, events left, phase, step]`` of a fresh stream."""
        sid = f"s{self._next_id}".encode()
        self._next_id += 1
        life = 1 + int(self._rng.expovariate(1.0 / self.w.mean_life))
        return [sid, life, self._rng.uniform(0, 2 * math.pi), 0]

    def open(self, assignment: Any, resume: Mapping[str, Any]) -> None:
        assignment.assigned([0])
        self._start = time.monotonic()

    def poll(self, timeout_s: float) -> list[Message]:
        """The messages due by now at ``rate_hz`` (at most ``max_batch``); waits up to ``timeout_s`` for
        the next one when none is due."""
        assert self._start is not None, "poll before open"
        due = int((time.monotonic() - self._start) * self.w.rate_hz) - self._position
        if due <= 0:
            time.sleep(min(timeout_s, (1 - due) / self.w.rate_hz))
            return []
        return [self._message() for _ in range(min(due, self.w.max_batch))]

    def _message(self) -> Message:
        k = self._rng.randrange(len(self._live))
        stream = self._live[k]
        sid, left, phase, step = stream
        if left > 0:
            x = math.sin(phase + 0.2 * step) + 0.05 * self._rng.gauss(0.0, 1.0)
            payload = orjson.dumps({"x": [x]})
            stream[1], stream[3] = left - 1, step + 1
        else:  # its life is over: end it (this message) or abandon it; a new stream takes its place
            payload = END
            self._live[k] = self._new_stream()
            self.started += 1
            if self._rng.random() >= self.w.end_fraction:
                self.abandoned += 1
                return self._message()
            self.ended += 1
        return self._next(sid, payload)

    def _next(self, sid: bytes, payload: bytes) -> Message:
        msg = Message(payload, sid, 0, self._position, "churn", time.monotonic())
        self._position += 1
        return msg

    def counters(self) -> dict[str, int]:
        """Streams started, ended, abandoned; messages offered: due by now at ``rate_hz``."""
        offered = int((time.monotonic() - self._start) * self.w.rate_hz) if self._start else 0
        return {"started": self.started, "ended": self.ended, "abandoned": self.abandoned, "offered": offered}

    def positions(self) -> dict[str, Any]:
        return {"churn": self._position}

    def commit(self) -> None:
        pass

    def rollback(self) -> list[int]:
        return [0]

    def close(self) -> None:
        pass


def build_worker(workload: Workload, workdir: Path, port: int) -> Any:
    """The pipeline the worker runs (module docstring), its admin endpoint on ``port``."""
    from connectors.codec import Decoder, KeyedDecoder
    from connectors.files import JsonLinesDeadLetters, NullSink
    from engine import Engine
    from models import load_bundle
    from rnnstream.admin import AdminServer
    from rnnstream.checkpoint import LocalCheckpoint
    from rnnstream.pipeline import Pipeline
    from rnnstream.sensors import ForecastScoring

    model = load_bundle(MODEL)
    engine = Engine(model, device="cpu", ttl_s=workload.ttl_s, eviction="drop")
    pipeline = Pipeline(
        engine,
        ChurnSource(workload),
        KeyedDecoder(Decoder("json", model.feature_size)),
        NullSink(),
        JsonLinesDeadLetters(workdir / "dead-letters.jsonl"),
        LocalCheckpoint(workdir),
        scoring=ForecastScoring(["value"], model.info.features.get("normalisation")),
        checkpoint_interval_s=workload.checkpoint_ms / 1e3,
    )
    admin = AdminServer(engine, port, extra=pipeline.service_counters, health=pipeline.health)
    pipeline.add_on_close(admin.close)
    return pipeline


def inject_leak(kind: str | None) -> None:
    """The control run's deliberate bug: ``ended``: the engine never frees an ended stream's slot."""
    if kind == "ended":
        from engine.state import StateStore

        StateStore.release = lambda self, stream_id: None  # type: ignore[method-assign]
    elif kind is not None:
        raise ValueError(f"unknown leak {kind!r}")


def worker_main(workload: Workload, workdir: Path, port: int) -> None:
    """Run the worker's pipeline until SIGTERM."""
    inject_leak(workload.leak)
    build_worker(workload, workdir, port).run()


# ---- the watcher ----------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One observation of the worker: ``t_s`` seconds since it became ready, memory in MB."""

    t_s: float
    rss_mb: float
    threads: int
    fds: int
    cpu_pct: float
    events: int
    messages: int
    offered: int
    active_streams: int
    capacity: int
    evictions: int
    started: int
    ended: int
    abandoned: int
    checkpoints: int
    checkpoint_kb: float


@dataclass
class Check:
    name: str
    second: float  # the second third's figure
    last: float  # the last third's figure
    limit: str
    ok: bool


@dataclass
class SoakResult:
    workload: Workload
    limits: Limits
    samples: list[Sample] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(workload: Workload, workdir: Path, nice: int = 0) -> tuple[subprocess.Popen, str]:
    """The worker subprocess and its admin address, once ``/readyz`` answers 200 (60 s at most)."""
    port = _free_port()
    args = [sys.executable, "-m", "benchmarks.soak", "--worker", json.dumps(asdict(workload))]
    args += ["--workdir", str(workdir), "--port", str(port)]
    log = open(workdir / "worker.log", "ab")  # noqa: SIM115 (owned by the process)
    env = dict(os.environ)
    if workload.onednn_cache is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(workload.onednn_cache)
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the soak worker exited {proc.returncode}:\n{_tail(workdir / 'worker.log')}")
        try:
            call_admin(address, "/readyz", timeout_s=2)
            return proc, address
        except (RuntimeError, OSError):  # 503 (not ready yet), or not listening yet
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the soak worker was not ready in 60 s:\n{_tail(workdir / 'worker.log')}")


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def sample(proc: psutil.Process, address: str, checkpoint: Path, t_s: float) -> Sample:
    """One observation of the worker (``proc``, its admin ``address``, its checkpoint file)."""
    with proc.oneshot():
        rss, threads, fds = proc.memory_info().rss, proc.num_threads(), proc.num_fds()
        cpu = proc.cpu_percent()
    stats = call_admin(address, "/stats")
    service = stats["service"]
    return Sample(
        t_s=round(t_s, 2),
        rss_mb=round(rss / 2**20, 2),
        threads=threads,
        fds=fds,
        cpu_pct=round(cpu, 1),
        events=stats["events"],
        messages=int(service["messages"]),
        offered=int(service["source_offered"]),
        active_streams=stats["active_streams"],
        capacity=stats["capacity"],
        evictions=stats["evictions"],
        started=int(service["source_started"]),
        ended=int(service["source_ended"]),
        abandoned=int(service["source_abandoned"]),
        checkpoints=int(service["checkpoints"]),
        checkpoint_kb=round(checkpoint.stat().st_size / 1024, 1) if checkpoint.exists() else 0.0,
    )


def run_soak(
    workload: Workload,
    limits: Limits,
    duration_s: float,
    sample_s: float,
    workdir: Path,
    nice: int = 0,
    on_sample: Callable[[Sample], None] | None = None,
) -> SoakResult:
    """Start the worker, sample it every ``sample_s`` s for ``duration_s`` s, stop it (SIGTERM), judge."""
    proc, address = start_worker(workload, workdir, nice)
    result = SoakResult(workload, limits)
    try:
        watched = psutil.Process(proc.pid)
        watched.cpu_percent()  # starts the CPU clock
        start = time.monotonic()
        for k in range(1, int(duration_s / sample_s) + 1):
            time.sleep(max(0.0, start + k * sample_s - time.monotonic()))
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the soak worker died ({proc.returncode}):\n{_tail(workdir / 'worker.log')}"
                )
            result.samples.append(sample(watched, address, workdir / "state.safetensors", k * sample_s))
            if on_sample is not None:
                on_sample(result.samples[-1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    result.checks = judge(result.samples, limits)
    return result


# ---- the verdict ------------------------------------------------------------------------------------------
def thirds(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """The samples of the second and of the last third of the run (by time; the first is warm-up)."""
    end = samples[-1].t_s
    second = [s for s in samples if end / 3 <= s.t_s < 2 * end / 3]
    last = [s for s in samples if s.t_s >= 2 * end / 3]
    return second, last


def rss_slope_mb_h(samples: list[Sample]) -> float:
    """Least-squares slope of RSS over ``samples``, MB per hour."""
    t_h = np.array([s.t_s for s in samples]) / 3600
    rss = np.array([s.rss_mb for s in samples])
    return float(np.polyfit(t_h, rss, 1)[0])


def judge(samples: list[Sample], limits: Limits) -> list[Check]:
    """The checks of the module docstring; needs at least two samples in each of the last two thirds."""
    second, last = thirds(samples)
    if len(second) < 2 or len(last) < 2:
        raise ValueError(f"{len(samples)} samples: too few to judge (sample more often or run longer)")

    def mean(part: list[Sample], key: str) -> float:
        return float(np.mean([getattr(s, key) for s in part]))

    def peak(part: list[Sample], key: str) -> float:
        return float(max(getattr(s, key) for s in part))

    r = limits.slots_ratio
    growth = mean(last, "rss_mb") - mean(second, "rss_mb")
    slope = rss_slope_mb_h(second + last)
    checks = [
        Check(
            "RSS, mean MB",
            mean(second, "rss_mb"),
            mean(last, "rss_mb"),
            f"+{limits.rss_growth_mb} MB",
            growth <= limits.rss_growth_mb,
        ),
        Check(
            "RSS slope, MB/h (after warm-up)",
            slope,
            slope,
            f"≤ {limits.rss_slope_mb_h}",
            slope <= limits.rss_slope_mb_h,
        ),
    ]
    for key, name in (("active_streams", "active streams, mean"), ("checkpoint_kb", "checkpoint KB, mean")):
        a, b = mean(second, key), mean(last, key)
        checks.append(Check(name, a, b, f"× {r}", b <= r * a))
    a, b = peak(second, "capacity"), peak(last, "capacity")
    checks.append(Check("slot capacity, max", a, b, f"× {r}", b <= r * a))
    for key, name in (("threads", "threads, max"), ("fds", "open fds, max")):
        a, b = peak(second, key), peak(last, key)
        checks.append(Check(name, a, b, f"+{limits.fd_slack}", b <= a + limits.fd_slack))
    done, offered = samples[-1].messages, samples[-1].offered
    checks.append(
        Check(
            "messages offered → processed",
            offered,
            done,
            f"≥ {limits.min_processed:.0%}",
            done >= limits.min_processed * offered,
        )
    )
    return checks


# ---- outputs ----------------------------------------------------------------------------------------------
def write_csv(samples: list[Sample], path: Path) -> None:
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(asdict(samples[0])))
        out.writeheader()
        out.writerows(asdict(s) for s in samples)


def plot(result: SoakResult, path: Path) -> Path:
    """RSS, streams and slots, the checkpoint, threads and fds over time (minutes), one panel each (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = result.samples
    t = np.array([x.t_s for x in s]) / 60
    fig = Figure(figsize=(11, 10), layout="constrained")
    FigureCanvasAgg(fig)
    rss, streams, stored, handles = fig.subplots(4, 1, sharex=True, height_ratios=(3, 2, 2, 2))
    w = result.workload
    fig.suptitle(
        f"rnnstream soak: {s[-1].events:,} events in {t[-1]:.0f} min at {w.rate_hz:,.0f} msg/s, "
        f"{s[-1].started:,} streams, TTL {w.ttl_s:g} s: {'PASS' if result.ok else 'FAIL'}"
    )
    rss.plot(t, [x.rss_mb for x in s], color="tab:blue")
    rss.set_ylabel("worker RSS (MB)")
    for edge in (t[-1] / 3, 2 * t[-1] / 3):
        for ax in (rss, streams, stored, handles):
            ax.axvline(edge, color="grey", lw=0.6, ls="--")
    streams.plot(t, [x.active_streams for x in s], label="active streams")
    streams.plot(t, [x.capacity for x in s], label="slot capacity")
    streams.set_ylabel("streams")
    streams.legend(loc="upper left")
    stored.plot(t, [x.checkpoint_kb / 1024 for x in s], color="tab:purple")
    stored.set_ylabel("checkpoint file (MB)")
    handles.plot(t, [x.threads for x in s], label="threads")
    handles.plot(t, [x.fds for x in s], label="open fds")
    handles.set_ylabel("count")
    handles.set_xlabel("minutes (dashed: warm-up | second third | last third)")
    handles.legend(loc="upper left")
    fig.savefig(path, dpi=90)
    return path


def tables(result: SoakResult) -> list[Table]:
    s = result.samples
    summary = Table(title="soak run")
    for col in (
        "duration",
        "events",
        "events/s",
        "streams started",
        "ended",
        "evicted",
        "RSS first→last",
        "worker CPU",
    ):
        summary.add_column(col, justify="right")
    cpu = np.mean([x.cpu_pct for x in s])
    summary.add_row(
        f"{s[-1].t_s / 60:.1f} min",
        f"{s[-1].events:,}",
        f"{s[-1].events / s[-1].t_s:,.0f}",
        f"{s[-1].started:,}",
        f"{s[-1].ended:,}",
        f"{s[-1].evictions:,}",
        f"{s[0].rss_mb:.0f} → {s[-1].rss_mb:.0f} MB",
        f"{cpu:.0f}%",
    )
    verdict = Table(title=f"verdict: {'PASS' if result.ok else 'FAIL'} (first third: warm-up)")
    for col in ("check", "second third", "last third", "limit", "ok"):
        verdict.add_column(col, justify="right")
    for c in result.checks:
        verdict.add_row(c.name, f"{c.second:,.1f}", f"{c.last:,.1f}", c.limit, "yes" if c.ok else "NO")
    return [summary, verdict]


def report(result: SoakResult, out: Path) -> None:
    """``soak.csv``, ``rss.png`` and ``soak.json`` in ``out``; the tables printed."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result.samples, out / "soak.csv")
    plot(result, out / "rss.png")
    s = result.samples
    second, last = thirds(s)
    results = {
        "workload": asdict(result.workload),
        "limits": asdict(result.limits),
        "ok": result.ok,
        "duration_s": s[-1].t_s,
        "events": s[-1].events,
        "events_per_s": s[-1].events / s[-1].t_s,
        "rss_first_mb": s[0].rss_mb,
        "rss_last_mb": s[-1].rss_mb,
        "rss_slope_mb_h": rss_slope_mb_h(second + last),
        "checks": [asdict(c) for c in result.checks],
    }
    from benchmarks.engine_bench import machine_info

    results["machine"] = machine_info(torch.device("cpu"))
    publish(bench_console(), tables(result), results, out / "soak.json")


def read_csv(path: Path) -> list[Sample]:
    """Samples written by ``write_csv`` (or by a run's progress), to judge and plot a run again."""
    types = {f.name: f.type for f in dataclasses.fields(Sample)}
    with open(path, newline="") as f:
        return [
            Sample(**{k: float(v) if types[k] == "float" else int(v) for k, v in row.items()})
            for row in csv.DictReader(f)
        ]


class ProgressLog:
    """Prints each sample and appends it to ``out/soak.csv`` as it comes (a run cut short keeps its data)."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "soak.csv"
        self.path.unlink(missing_ok=True)
        self.console = bench_console()

    def __call__(self, s: Sample) -> None:
        self.console.print(
            f"{s.t_s / 60:6.1f} min  RSS {s.rss_mb:7.1f} MB  streams {s.active_streams:6,}/{s.capacity:,}  "
            f"threads {s.threads}  fds {s.fds}  events {s.events:,}  ckpt {s.checkpoint_kb:,.0f} KB  "
            f"cpu {s.cpu_pct:.0f}%"
        )
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(asdict(s)))
            if new:
                out.writeheader()
            out.writerow(asdict(s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Workload()
    parser.add_argument("--duration-s", type=float, default=1860.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=d.rate_hz, help="messages/s offered")
    parser.add_argument("--live", type=int, default=d.live)
    parser.add_argument("--mean-life", type=float, default=d.mean_life)
    parser.add_argument("--ttl-s", type=float, default=d.ttl_s)
    parser.add_argument("--end-fraction", type=float, default=d.end_fraction)
    parser.add_argument("--onednn-cache", type=int, default=None, help="oneDNN primitive cache capacity")
    parser.add_argument("--leak", choices=["ended"], default=None, help="control run with a deliberate leak")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the worker")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--from-csv", type=Path, help="judge and plot the samples of an earlier run again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the worker's Workload as JSON
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(Workload(**json.loads(args.worker)), args.workdir, args.port)
        return 0
    workload = Workload(
        rate_hz=args.rate,
        live=args.live,
        mean_life=args.mean_life,
        end_fraction=args.end_fraction,
        ttl_s=args.ttl_s,
        leak=args.leak,
        onednn_cache=args.onednn_cache,
    )
    if args.from_csv:
        result = SoakResult(workload, Limits(), read_csv(args.from_csv))
        result.checks = judge(result.samples, result.limits)
        report(result, args.out)
        return 0 if result.ok else 1
    with tempfile.TemporaryDirectory(prefix="rnnstream-soak-") as tmp:
        result = run_soak(
            workload, Limits(), args.duration_s, args.sample_s, Path(tmp), args.nice, ProgressLog(args.out)
        )
    report(result, args.out)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
