"""Kafka end-to-end benchmark: a real broker, the real ``rnnstream run`` service (a subprocess), consume →
decode → infer → produce, with state checkpointed in Kafka transactions.

Run ``python -m benchmarks.kafka_bench [--quick] [--json PATH]`` (or ``rnnstream bench kafka``).

For each client library (kafka-python, the default; confluent-kafka, the optional fast backend):
- single-event messages/s: JSON ``{"x": [v]}`` messages over 1,000 streams, pre-loaded, drained;
- batched payloads, events/s: float32 frames of 100 timesteps per message;
- latency at a fixed offered rate (20,000 msg/s, open loop, paced by a separate producer process that
  stamps each message with its scheduled send time), for checkpoint intervals of 200 ms (the default)
  and 20 ms, after a warm-up; in ms from the scheduled send time: *produced* = broker append time of
  the output (``LogAppendTime``: when a ``read_uncommitted`` consumer can read it), *committed* = when a
  ``read_committed`` consumer received it (outputs commit with the state, so this adds up to one
  checkpoint interval plus the commit); also its parts, input appended and service.
Then where the time goes in the service loop (in-process run with timers around each stage).
The model is the shipped sensor LSTM (1 feature, hidden 32). The broker runs on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console
from rich.table import Table

import models
from benchmarks.report import publish
from rnnstream import kafka_broker as kb

MODEL = Path(models.__file__).parent / "assets" / "sensor_lstm.safetensors"
LIBRARIES = ("kafka-python", "confluent-kafka")
STREAMS = 1000
PARTITIONS = 4
INTERVALS_MS = (200, 20)  # checkpoint intervals for the latency runs: the default, and low-latency
TARGETS = {"single_msgs_per_s": 50_000, "batched_events_per_s": 500_000, "p99_ms": 50.0}
Progress = Callable[[str], None]


# ---- Kafka plumbing (confluent-kafka: the fastest way to load and read topics) ----------------------
def create_topic(
    bootstrap: str, topic: str, partitions: int = PARTITIONS, config: dict | None = None
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # keep the handle alive until the result
    for future in admin.create_topics([NewTopic(topic, partitions, config=config or {})]).values():
        future.result(30)


def produce_all(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "queue.buffering.max.messages": 1_000_000}
    )
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(120)


def committed_total(bootstrap: str, group: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=30))
    finally:
        consumer.close()


def end_offsets_total(bootstrap: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:6]}"})
    try:
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)
        )
    except Exception:  # the topic may not exist yet
        return 0
    finally:
        consumer.close()


def single_event_messages(n: int, rng: np.random.Generator) -> list[tuple[bytes, bytes]]:
    ids = rng.integers(0, STREAMS, n)
    vals = rng.standard_normal(n)
    return [(b"s%d" % i, b'{"x":[%.6f]}' % v) for i, v in zip(ids, vals, strict=True)]


def batched_messages(n: int, steps: int, rng: np.random.Generator) -> list[tuple[bytes, bytes]]:
    ids = rng.integers(0, STREAMS, n)
    frames = rng.standard_normal((n, steps)).astype("<f4")
    return [(b"s%d" % i, frames[k].tobytes()) for k, i in enumerate(ids)]


# ---- the service under test -------------------------------------------------------------------------
def service_config(
    bootstrap: str, topic: str, library: str, encoding: str, workdir: Path, interval_ms: int = 200
) -> Path:
    cfg = {
        "model": str(MODEL),
        "kafka": {"bootstrap_servers": bootstrap, "client_library": library},
        "source": {"type": "kafka", "topics": [topic], "group_id": f"bench-{topic}", "format": encoding},
        "sink": {"type": "kafka", "topic": f"{topic}-out"},
        "dead_letters": {"type": "kafka", "topic": f"{topic}-dlq"},
        "engine": {"device": "cpu"},
        "checkpoint": {"interval_ms": interval_ms},
    }
    path = workdir / f"{topic}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextmanager
def running_service(config: Path, workdir: Path):
    log = open(workdir / f"{config.stem}.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnstream.cli", "run", str(config)], stdout=log, stderr=log
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def drain_rate(bootstrap: str, topic: str, library: str, encoding: str, messages, workdir: Path) -> dict:
    """Pre-load ``messages``, start the service, time from its first output until every input offset is
    committed (state checkpointed). Returns messages/s and events/s."""
    create_topic(bootstrap, topic)
    produce_all(bootstrap, topic, messages)
    cfg = service_config(bootstrap, topic, library, encoding, workdir)
    group = f"bench-{topic}"
    with running_service(cfg, workdir) as proc:
        deadline = time.monotonic() + 600
        while end_offsets_total(bootstrap, f"{topic}-out") == 0:
            _check_alive(proc, deadline, workdir, cfg)
            time.sleep(0.02)
        start = time.perf_counter()
        while committed_total(bootstrap, group, topic) < len(messages):
            _check_alive(proc, deadline, workdir, cfg)
            time.sleep(0.05)
        seconds = time.perf_counter() - start
    return {"messages": len(messages), "seconds": seconds, "msgs_per_s": len(messages) / seconds}


def _check_alive(proc: subprocess.Popen, deadline: float, workdir: Path, cfg: Path) -> None:
    if proc.poll() is not None or time.monotonic() > deadline:
        log = (workdir / f"{cfg.stem}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"service stopped or timed out:\n{log}")


# ---- latency at a fixed offered rate ----------------------------------------------------------------
# Message i is due at start + i / rate and carries that scheduled time (epoch ms, float64) in header "t".
# The generator never waits for answers (open loop), so a slow service cannot slow the offered load
# (no coordinated omission), and latency counts from the schedule: the generator's own lateness and
# its producer's batching (linger.ms) are included. linger.ms=5: with 1 ms, ~4,000 tiny produce
# requests/s (librdkafka sends a request per partition batch) kept the broker busy enough that inputs
# reached it 0.8-2.6 s late (p50) on 2 cores.
PACED_PRODUCER = """
import sys, time, struct, json
from confluent_kafka import Producer
bootstrap, topic, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
n = int(rate * seconds); start = time.time() + 0.05; i = 0; late = 0.0
while i < n:
    now = time.time()
    due = min(int((now - start) * rate) + 1, n)
    if due > i:
        late = max(late, now - (start + i / rate))
    while i < due:
        t = struct.pack("<d", (start + i / rate) * 1e3)
        p.produce(topic, b'{"x":[%.4f]}' % ((i % 97) / 50.0 - 1), b"s%d" % (i % 1000), headers=[("t", t)])
        i += 1
    p.poll(0)
    wait = start + i / rate - time.time()
    if wait > 0:
        time.sleep(wait)
p.flush(60)
print(json.dumps({"max_schedule_lag_ms": late * 1e3}))
"""


def latency_at_rate(
    bootstrap: str,
    topic: str,
    library: str,
    rate: float,
    seconds: float,
    workdir: Path,
    interval_ms: int = 200,
    warmup_s: float = 2.0,
) -> dict:
    """Offer ``rate`` single-event msg/s for ``warmup_s + seconds``; measure the messages scheduled after
    the warm-up (the service's first second includes creating 1,000 streams and its first transaction).

    From each input's scheduled send time: *produced* = broker append time of its output (LogAppendTime:
    what a ``read_uncommitted`` consumer can read), *committed* = when a ``read_committed`` consumer
    received the output (waits for the checkpoint transaction's commit). Also the parts: input appended
    (generator + broker) and service (output append − input append)."""
    for name in (topic, f"{topic}-out"):
        create_topic(bootstrap, name, config={"message.timestamp.type": "LogAppendTime"})
    cfg = service_config(bootstrap, topic, library, "json", workdir, interval_ms)
    with running_service(cfg, workdir) as proc:
        _wait_assigned(bootstrap, topic, proc, workdir, cfg)
        raw: list[tuple[bytes, float]] = []
        stop = threading.Event()
        reader = threading.Thread(target=_read_committed, args=(bootstrap, f"{topic}-out", raw, stop))
        reader.start()
        time.sleep(1.0)  # the reader's group join
        gen = subprocess.run(
            [sys.executable, "-c", PACED_PRODUCER, bootstrap, topic, str(rate), str(warmup_s + seconds)],
            check=True,
            timeout=600,
            capture_output=True,
            text=True,
        )
        expected = int(rate * (warmup_s + seconds))
        deadline = time.monotonic() + 120
        while len(raw) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        reader.join()
    received: dict[tuple[int, int], float] = {}
    for value, at in raw:
        doc = json.loads(value)
        received.setdefault((doc["partition"], doc["offset"]), at)
    inputs = _timestamps(
        bootstrap, topic, key_of=lambda m: (m.partition(), m.offset()), value_of=_sched_append
    )
    out_ts = _timestamps(bootstrap, f"{topic}-out", key_of=_answered_position, committed=False)
    first = min(sched for sched, _ in inputs.values()) + warmup_s * 1e3
    measured = {k: v for k, v in inputs.items() if v[0] >= first}
    sched = {k: v[0] for k, v in measured.items()}
    appended = np.array([append - s for s, append in measured.values()])
    produced = np.array([out_ts[k] - sched[k] for k in sched if k in out_ts])
    service = np.array([out_ts[k] - measured[k][1] for k in sched if k in out_ts])
    committed = np.array([received[k] * 1e3 - sched[k] for k in sched if k in received])
    missing = len(sched) - len(committed)
    if missing:  # unanswered within the deadline: count them as infinitely late, not as absent
        committed = np.concatenate([committed, np.full(missing, np.inf)])
        produced = np.concatenate([produced, np.full(len(sched) - len(produced), np.inf)])
    return {
        "offered_rate": rate,
        "interval_ms": interval_ms,
        "warmup_s": warmup_s,
        "messages": expected,
        "measured": len(sched),
        "answered": len(received),
        "generator_max_schedule_lag_ms": json.loads(gen.stdout)["max_schedule_lag_ms"],
        **_percentiles("input_appended", appended),
        **_percentiles("service", service),
        **_percentiles("produce", produced),
        **_percentiles("committed", committed),
    }


def _percentiles(name: str, ms: np.ndarray) -> dict[str, float]:
    # nearest rank at or above (no interpolation: an unanswered message, inf, must not become nan)
    return {f"{name}_p{q}_ms": float(np.percentile(ms, q, method="higher")) for q in (50, 99)} | {
        f"{name}_max_ms": float(ms.max())
    }


def _sched_append(message) -> tuple[float, int]:
    (sched,) = struct.unpack("<d", dict(message.headers())["t"])
    return sched, message.timestamp()[1]


def _wait_assigned(bootstrap: str, topic: str, proc, workdir: Path, cfg: Path) -> None:
    deadline = time.monotonic() + 120
    while "assigned partitions" not in (workdir / f"{cfg.stem}.log").read_text(errors="replace"):
        _check_alive(proc, deadline, workdir, cfg)
        time.sleep(0.05)


def _answered_position(message) -> tuple[int, int]:
    doc = json.loads(message.value())
    return (doc["partition"], doc["offset"])


def _read_committed(bootstrap: str, topic: str, raw: list, stop: threading.Event) -> None:
    """Append ``(output value, receive time)`` for every output a ``read_committed`` consumer gets."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"lat-{uuid.uuid4().hex[:6]}",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    try:
        while not stop.is_set():
            # consume(n, timeout) returns after n messages or the whole timeout: a short timeout keeps the
            # receive time within ~2 ms of delivery (1000 / 50 ms added ~25 ms at 20k msg/s)
            batch = consumer.consume(10_000, 0.002)
            now = time.time()
            for m in batch:  # outputs are parsed afterwards: the observer should not load the 2 cores
                if m.error() is None:
                    raw.append((m.value(), now))
    finally:
        consumer.close()


def _timestamps(bootstrap: str, topic: str, key_of, committed: bool = True, value_of=None) -> dict:
    """``{key_of(message): value_of(message)}`` (default: record timestamp, ms) for every record."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"ts-{uuid.uuid4().hex[:6]}",
            "isolation.level": "read_committed" if committed else "read_uncommitted",
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    out: dict = {}
    pending = set(range(PARTITIONS))
    try:
        while pending:
            for m in consumer.consume(10_000, 1.0):
                if m.error() is None:
                    out.setdefault(key_of(m), value_of(m) if value_of else m.timestamp()[1])
                else:
                    pending.discard(m.partition())
    finally:
        consumer.close()
    return out


# ---- where the time goes ----------------------------------------------------------------------------
def stage_profile(bootstrap: str, topic: str, library: str, messages, workdir: Path) -> dict:
    """Run the service in this process with timers around each stage of its loop."""
    from rnnstream.config import load_config
    from rnnstream.service import build_pipeline

    create_topic(bootstrap, topic)
    produce_all(bootstrap, topic, messages)
    service = build_pipeline(load_config(service_config(bootstrap, topic, library, "json", workdir)))
    client = service.source.client  # type: ignore[attr-defined]
    timers: dict[str, float] = {}
    _time(client, "poll", timers, "client: poll")
    _time(client, "send_many", timers, "client: produce")
    _time(client, "commit", timers, "client: commit transaction")
    _time(service.engine, "step_many", timers, "engine: step_many")
    _time(service, "_process", timers, "service: process")
    _time(service, "checkpoint", timers, "service: checkpoint")
    thread = threading.Thread(target=service.run)
    thread.start()
    while service.counters.messages == 0:
        time.sleep(0.01)
    timers.clear()
    start = time.perf_counter()
    while service.counters.messages < len(messages):
        time.sleep(0.02)
    wall = time.perf_counter() - start
    service.stop()
    thread.join()
    process = timers.pop("service: process", 0.0)
    inner = timers["engine: step_many"] + timers["client: produce"]
    timers["service: decode, encode, bookkeeping"] = process - inner
    timers["service: checkpoint (state snapshot + sends)"] = (
        timers.pop("service: checkpoint") - timers["client: commit transaction"]
    )
    return {"wall_s": wall, "messages": len(messages), "stages_s": timers}


def _time(obj: Any, name: str, timers: dict[str, float], label: str) -> None:
    inner = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            timers[label] = timers.get(label, 0.0) + time.perf_counter() - t

    setattr(obj, name, timed)


# ---- the whole run ----------------------------------------------------------------------------------
def run_kafka_benchmarks(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    say = progress or (lambda _msg: None)
    rng = np.random.default_rng(0)
    sizes = {"kafka-python": (20_000, 2_000), "confluent-kafka": (300_000, 10_000)}
    if quick:
        sizes = {lib: (n // 10, b // 10) for lib, (n, b) in sizes.items()}
    rate, seconds, warmup_s = (20_000.0, 3.0, 1.0) if quick else (20_000.0, 10.0, 2.0)
    results: dict[str, Any] = {"targets": TARGETS, "libraries": {}, "machine": _machine()}
    workdir = Path(tempfile.mkdtemp(prefix="rnnstream-kafka-bench-"))
    with kb.start_cluster(1, base_dir=workdir / "broker") as cluster:
        bootstrap = cluster.bootstrap
        for lib in LIBRARIES:
            n_single, n_batched = sizes[lib]
            say(f"{lib}: single-event throughput ({n_single:,} messages)")
            single = drain_rate(
                bootstrap, _topic(), lib, "json", single_event_messages(n_single, rng), workdir
            )
            say(f"{lib}: batched payloads ({n_batched:,} messages x 100 timesteps)")
            batched = drain_rate(
                bootstrap, _topic(), lib, "float32", batched_messages(n_batched, 100, rng), workdir
            )
            batched["events_per_s"] = batched["msgs_per_s"] * 100
            latency = {}
            for interval in INTERVALS_MS:
                say(f"{lib}: latency at {rate:,.0f} msg/s offered, checkpoints every {interval} ms")
                latency[str(interval)] = latency_at_rate(
                    bootstrap, _topic(), lib, rate, seconds, workdir, interval, warmup_s
                )
            results["libraries"][lib] = {"single": single, "batched": batched, "latency": latency}
        say("where the time goes (confluent-kafka, in-process)")
        results["profile"] = stage_profile(
            bootstrap,
            _topic(),
            "confluent-kafka",
            single_event_messages(sizes["confluent-kafka"][0] // 2, rng),
            workdir,
        )
    return results


def _topic() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


def _machine() -> dict[str, Any]:
    import platform

    import confluent_kafka
    import kafka

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kafka_broker": kb.KAFKA_VERSION,
        "kafka_python": kafka.__version__,
        "confluent_kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0],
    }


def render_tables(results: dict[str, Any]) -> list[Table]:
    t = Table(
        title="Kafka end to end (real broker on the same 2 cores; consume → infer → produce, exactly-once)"
    )
    for col in ("client", "single msg/s", "batched events/s"):
        t.add_column(col, justify="right")
    for lib, r in results["libraries"].items():
        t.add_row(
            lib,
            _mark(
                f"{r['single']['msgs_per_s']:,.0f}", r["single"]["msgs_per_s"] >= TARGETS["single_msgs_per_s"]
            ),
            _mark(
                f"{r['batched']['events_per_s']:,.0f}",
                r["batched"]["events_per_s"] >= TARGETS["batched_events_per_s"],
            ),
        )
    first = next(iter(results["libraries"].values()))["latency"]
    rate = next(iter(first.values()))["offered_rate"]
    lt = Table(
        title=f"Latency at {rate:,.0f} single-event msg/s offered, ms from each input's scheduled send time "
        "(p50 / p99)"
    )
    cols = ("client", "checkpoint", "input appended", "service", "produced", "committed", "answered")
    for col in cols:
        lt.add_column(col, justify="right")
    for lib, r in results["libraries"].items():
        for interval, lat in r["latency"].items():
            lt.add_row(
                lib,
                f"{interval} ms",
                _pair(lat, "input_appended"),
                _pair(lat, "service"),
                _mark(_pair(lat, "produce"), lat["produce_p99_ms"] <= TARGETS["p99_ms"]),
                _mark(_pair(lat, "committed"), lat["committed_p99_ms"] <= TARGETS["p99_ms"]),
                f"{lat['answered']:,}/{lat['messages']:,}",
            )
    prof = results["profile"]
    p = Table(title=f"Where the time goes (confluent-kafka, {prof['messages']:,} single-event messages)")
    p.add_column("stage")
    p.add_column("seconds", justify="right")
    p.add_column("share of wall", justify="right")
    for stage, sec in sorted(prof["stages_s"].items(), key=lambda kv: -kv[1]):
        p.add_row(stage, f"{sec:.2f}", f"{sec / prof['wall_s']:.0%}")
    p.add_row("wall", f"{prof['wall_s']:.2f}", "100%")
    return [t, lt, p]


def _pair(lat: dict[str, float], name: str) -> str:
    return f"{lat[f'{name}_p50_ms']:,.0f} / {lat[f'{name}_p99_ms']:,.0f}"


def _mark(text: str, ok: bool) -> str:
    return f"{text} [green]✓[/]" if ok else f"{text} [red]✗[/]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    parser.add_argument("--json", type=Path, default=Path("results/kafka_bench.json"))
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 120))
    results = run_kafka_benchmarks(args.quick, progress=lambda m: console.print(f"[dim]{m}[/]"))
    publish(console, render_tables(results), results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
