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
Then where the time goes in the service loop of the default library (in-process run with timers
around each stage). The model is the shipped sensor LSTM (1 feature, hidden 32). The broker runs on the
same machine. Targets (each marked ✓/✗): single-event ≥ 50,000 msg/s and batched ≥ 500,000 events/s
with the default library; at 20,000 msg/s offered, service p99 ≤ 20 ms and produced p99 ≤ 50 ms. The
tables name the machine (CPU model, cores, torch version) and the load average around the run: the
broker, the generator and the service share the cores, and anything else running skews every figure.
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
from benchmarks.engine_bench import cpu_model
from benchmarks.report import publish
from rnnstream import kafka_broker as kb

MODEL = Path(models.__file__).parent / "assets" / "sensor_lstm.safetensors"
LIBRARIES = ("kafka-python", "confluent-kafka")
DEFAULT_LIBRARY = "kafka-python"  # KafkaConnection.client_library's default (a test checks)
STREAMS = 1000
PARTITIONS = 4
INTERVALS_MS = (200, 20)  # checkpoint intervals for the latency runs: the default, and low-latency
TARGETS = {
    "single_msgs_per_s": 50_000,  # drain rate of single-event messages
    "batched_events_per_s": 500_000,  # drain rate of 100-timestep messages, in events
    "offered_rate": 20_000,  # msg/s offered for the latency figures
    "service_p99_ms": 20.0,  # input appended -> output appended
    "produced_p99_ms": 50.0,  # scheduled send -> output appended
}
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
        start, cpu = time.perf_counter(), _cpu_seconds(proc.pid)
        while committed_total(bootstrap, group, topic) < len(messages):
            _check_alive(proc, deadline, workdir, cfg)
            time.sleep(0.05)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds(proc.pid) - cpu
    return {
        "messages": len(messages),
        "seconds": seconds,
        "msgs_per_s": len(messages) / seconds,
        # the service's own CPU per message (all its threads), from its first output to the last commit:
        # less sensitive to other load than the rate (the first output comes after a few messages)
        "service_cpu_us_per_msg": cpu / len(messages) * 1e6,
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


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
    """Run the service in this process with timers around each stage of its loop (the pipeline's thread;
    the client library's own threads, such as kafka-python's sender, run beside it)."""
    from rnnstream.config import load_config
    from rnnstream.service import build_pipeline

    create_topic(bootstrap, topic)
    produce_all(bootstrap, topic, messages)
    service = build_pipeline(load_config(service_config(bootstrap, topic, library, "json", workdir)))
    client = service.source.client  # type: ignore[attr-defined]
    timers: dict[str, float] = {}
    _time(client, "poll", timers, "client: poll (fetch, read records)")
    _time(client, "send_many", timers, "client: produce outputs")
    _time(client, "send_to_partitions", timers, "client: produce changelog rows")
    _time(client, "commit", timers, "client: commit transaction")
    _time(service.engine, "step_many", timers, "engine: step_many")
    _time(service, "_process", timers, "service: process")
    _time(service, "checkpoint", timers, "service: checkpoint")
    thread = threading.Thread(target=service.run)
    thread.start()
    while service.counters.messages == 0:
        time.sleep(0.01)
    timers.clear()
    start, cpu = time.perf_counter(), time.process_time()
    while service.counters.messages < len(messages):
        time.sleep(0.02)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    service.stop()
    thread.join()
    poll = timers.get("client: poll (fetch, read records)", 0.0)
    process = timers.pop("service: process", 0.0)
    inner = timers.get("engine: step_many", 0.0) + timers.get("client: produce outputs", 0.0)
    timers["service: decode, encode, bookkeeping"] = process - inner
    checkpoint = timers.pop("service: checkpoint", 0.0)
    timers["service: checkpoint (state snapshot)"] = (
        checkpoint
        - timers.get("client: commit transaction", 0.0)
        - timers.get("client: produce changelog rows", 0.0)
    )
    timers["loop: the rest (Message objects, idle polls)"] = max(0.0, wall - process - checkpoint - poll)
    return {
        "library": library,
        "wall_s": wall,
        "cpu_s": cpu,  # this process: the pipeline, the engine's and the client's threads, and the timers
        "messages": len(messages),
        "stages_s": timers,
    }


def _time(obj: Any, name: str, timers: dict[str, float], label: str) -> None:
    inner = getattr(obj, name, None)
    if inner is None:  # a client without it
        return

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
    sizes = {"kafka-python": (300_000, 10_000), "confluent-kafka": (300_000, 10_000)}
    if quick:
        sizes = {lib: (n // 10, b // 10) for lib, (n, b) in sizes.items()}
    rate, seconds, warmup_s = (20_000.0, 3.0, 1.0) if quick else (20_000.0, 10.0, 2.0)
    warmup_broker_s = 3.0 if quick else 30.0
    results: dict[str, Any] = {
        "targets": TARGETS,
        "default_library": DEFAULT_LIBRARY,
        "libraries": {},
        "machine": _machine(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="rnnstream-kafka-bench-"))
    with kb.start_cluster(1, base_dir=workdir / "broker") as cluster:
        bootstrap = cluster.bootstrap
        # A broker started a moment ago appends slowly at first (the input appended p99 was 100-200 ms
        # in its first minutes, ~10 ms on one running for hours): a run at the offered rate first, not
        # measured, so the latency rows meet a broker closer to one that has been running.
        say(f"warming the broker up: {warmup_broker_s:.0f} s at {rate:,.0f} msg/s through the service")
        results["broker_warmup"] = latency_at_rate(
            bootstrap, _topic(), DEFAULT_LIBRARY, rate, warmup_broker_s, workdir, 200, 1.0
        )
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
        say(f"where the time goes ({DEFAULT_LIBRARY}, the default, in-process)")
        results["profile"] = stage_profile(
            bootstrap,
            _topic(),
            DEFAULT_LIBRARY,
            single_event_messages(sizes[DEFAULT_LIBRARY][0] // 2, rng),
            workdir,
        )
    results["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    return results


def _topic() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


def _machine() -> dict[str, Any]:
    import platform

    import confluent_kafka
    import kafka
    import torch

    from connectors.kafka_records import crc32c_backend

    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kafka_broker": kb.KAFKA_VERSION,
        "kafka_python": kafka.__version__,
        "kafka_python_crc32c": crc32c_backend(),
        "confluent_kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0],
        "load_average_1m": os.getloadavg()[0],
    }


def machine_line(results: dict[str, Any]) -> str:
    """Where the figures come from: CPU model, cores, torch version, load around the run."""
    m = results.get("machine", {})
    line = f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}"
    if "load_average_1m" in m:
        line += f"; load average {m['load_average_1m']:.2f} at the start"
        if "load_average_1m_end" in m:
            line += f", {m['load_average_1m_end']:.2f} at the end"
    if "kafka_python" in m:
        line += (
            f"; Kafka {m.get('kafka_broker', '?')}, kafka-python {m['kafka_python']} (CRC-32C: "
            f"{m.get('kafka_python_crc32c', '?')}), confluent-kafka {m.get('confluent_kafka', '?')}"
        )
    return line


def render_tables(results: dict[str, Any]) -> list[Table]:
    """The README's table (one row per client and checkpoint interval; throughput on each client's first
    row), marked against ``TARGETS``, and the profile."""
    default = results.get("default_library", DEFAULT_LIBRARY)
    first = next(iter(results["libraries"].values()))["latency"]
    rate = next(iter(first.values()))["offered_rate"]
    t = Table(
        title=(
            "Kafka end to end: a real broker on the same cores, consume → infer → produce, exactly-once; "
            f"latency at {rate:,.0f} single-event msg/s offered, ms (p50 / p99)"
        ),
        caption=machine_line(results),
    )
    cols = (
        "client",
        "single-event msg/s",
        "batched events/s (100 per msg)",
        "checkpoint every",
        "input appended p50 / p99",
        "service p50 / p99",
        "produced p50 / p99",
        "committed p50 / p99",
    )
    for col in cols:
        t.add_column(col, justify="right")
    unanswered = []
    for lib, r in results["libraries"].items():
        for k, (interval, lat) in enumerate(r["latency"].items()):
            single = batched = ""
            if k == 0:
                single = _mark(
                    f"{r['single']['msgs_per_s']:,.0f}",
                    r["single"]["msgs_per_s"] >= TARGETS["single_msgs_per_s"],
                )
                batched = _mark(
                    f"{r['batched']['events_per_s']:,.0f}",
                    r["batched"]["events_per_s"] >= TARGETS["batched_events_per_s"],
                )
            t.add_row(
                f"{lib} (default)" if lib == default and k == 0 else (lib if k == 0 else ""),
                single,
                batched,
                f"{interval} ms",
                _pair(lat, "input_appended"),
                _mark(_pair(lat, "service"), lat["service_p99_ms"] <= TARGETS["service_p99_ms"]),
                _mark(_pair(lat, "produce"), lat["produce_p99_ms"] <= TARGETS["produced_p99_ms"]),
                _pair(lat, "committed"),
            )
            if lat["answered"] < lat["messages"]:
                unanswered.append(f"{lib} {interval} ms: {lat['answered']:,}/{lat['messages']:,} answered")
    cpu = [
        f"{lib} {r['single']['service_cpu_us_per_msg']:.1f} µs"
        for lib, r in results["libraries"].items()
        if "service_cpu_us_per_msg" in r["single"]
    ]
    if cpu:
        t.caption = f"{t.caption}\nService CPU per single-event message (all its threads): " + ", ".join(cpu)
    if unanswered:
        t.caption = f"{t.caption}\nUnanswered inputs count as infinitely late: " + "; ".join(unanswered)
    prof = results["profile"]
    p = Table(
        title=(
            f"Where the time goes ({prof.get('library', '?')}, {prof['messages']:,} single-event messages "
            "drained in-process; stages of the pipeline's thread)"
        ),
        caption=(
            f"{prof['wall_s'] / prof['messages'] * 1e6:.1f} µs per message of wall time"
            + (
                f", {prof['cpu_s'] / prof['messages'] * 1e6:.1f} µs of CPU (all of the process's threads)"
                if "cpu_s" in prof
                else ""
            )
        ),
    )
    p.add_column("stage")
    p.add_column("seconds", justify="right")
    p.add_column("share of wall", justify="right")
    for stage, sec in sorted(prof["stages_s"].items(), key=lambda kv: -kv[1]):
        p.add_row(stage, f"{sec:.2f}", f"{sec / prof['wall_s']:.0%}")
    p.add_row("wall", f"{prof['wall_s']:.2f}", "100%")
    return [t, p]


def _pair(lat: dict[str, float], name: str) -> str:
    return f"{lat[f'{name}_p50_ms']:,.0f} / {lat[f'{name}_p99_ms']:,.0f}"


def _mark(text: str, ok: bool) -> str:
    return f"{text} [green]✓[/]" if ok else f"{text} [red]✗[/]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    parser.add_argument("--json", type=Path, default=Path("results/kafka_bench.json"))
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 200))
    results = run_kafka_benchmarks(args.quick, progress=lambda m: console.print(f"[dim]{m}[/]"))
    publish(console, render_tables(results), results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
