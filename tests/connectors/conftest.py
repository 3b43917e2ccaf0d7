"""A real Kafka broker for the connector tests, and helpers to drive the ``rnnstream run`` service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models import ModelInfo, StreamModel, from_torch, save_bundle

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServiceRun:
    """Runs ``rnnstream run`` as a real subprocess against a broker."""

    bootstrap: str
    workdir: Path
    model: StreamModel
    model_path: Path
    topic: str
    group: str
    partitions: int
    encoding: str = "json"
    interval_ms: int = 200
    library: str = "kafka-python"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # merged into the config (one level deep)

    @property
    def outputs_topic(self) -> str:
        return f"{self.topic}-out"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}-dlq"

    def config_path(self, instance: str) -> Path:
        cfg = {
            "model": str(self.model_path),
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "instance_id": instance,
                "client_library": self.library,
                "consumer": (
                    {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
                    if self.library == "kafka-python"
                    else {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
                ),
            },
            "source": {
                "type": "kafka",
                "topics": [self.topic],
                "group_id": self.group,
                "format": self.encoding,
                "max_timesteps_per_message": 64,
                "max_message_bytes": 4096,
            },
            "sink": {"type": "kafka", "topic": self.outputs_topic},
            "dead_letters": {"type": "kafka", "topic": self.dlq_topic},
            "engine": {"device": "cpu"},
            "checkpoint": {"interval_ms": self.interval_ms, "transaction_timeout_ms": 8000},
        }
        for key, value in self.extra.items():
            cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) else value
        path = self.workdir / f"service-{instance}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def start(self, instance: str = "0") -> subprocess.Popen:
        log = open(self.workdir / f"service-{instance}.log", "ab")  # noqa: SIM115 (owned by the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "rnnstream.cli", "run", str(self.config_path(instance))],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
        self.procs[instance] = proc
        return proc

    def kill(self, instance: str = "0") -> None:
        proc = self.procs.pop(instance)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def terminate(self, instance: str = "0", timeout: float = 60) -> int:
        proc = self.procs.pop(instance)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def stop_all(self) -> None:
        for instance in list(self.procs):
            self.kill(instance)

    def consume(self, topic: str, expected: int, timeout_s: float = 120) -> list:
        """``consume_all`` that fails at once, with the log, if a service process died."""
        return consume_all(self.bootstrap, topic, expected, timeout_s, check=self.check_alive)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.log(name)[-5000:]
                raise AssertionError(f"service {name} exited {proc.returncode}:\n{log}")

    def log(self, instance: str = "0") -> str:
        path = self.workdir / f"service-{instance}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def make_model(workdir: Path, features: int = 3, seed: int = 0) -> tuple[StreamModel, Path]:
    torch.manual_seed(seed)
    model = from_torch(torch.nn.GRU(features, 16, 2), torch.nn.Linear(16, 2), info=ModelInfo(version=3))
    return model, save_bundle(model, workdir / "model.safetensors")


def create_topic(bootstrap: str, topic: str, partitions: int, replication: int = 1) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, replication)])
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush(60)
    finally:
        producer.close()


def produce_paced(
    bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]], rate: float
) -> None:
    """Produce ``messages`` at about ``rate`` per second (in 20 ms slices), as a live source would."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        per_slice = max(1, int(rate * 0.02))
        start = time.monotonic()
        for i in range(0, len(messages), per_slice):
            for key, value in messages[i : i + per_slice]:
                producer.send(topic, key=key, value=value)
            time.sleep(max(0.0, start + (i + per_slice) / rate - time.monotonic()))
        producer.flush(60)
    finally:
        producer.close()


def consume_all(
    bootstrap: str,
    topic: str,
    expected: int,
    timeout_s: float = 120,
    committed_only: bool = True,
    check: Callable[[], None] | None = None,
) -> list:
    """Read ``topic`` from the beginning until ``expected`` records arrived (or time ran out), with one
    consumer that keeps what it read (``check``, if given, is called between polls: raise to give up).
    (It used to start again from the beginning every 10 s, and the last round, cut short by the deadline,
    could report a late but complete run as records missing.)"""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed" if committed_only else "read_uncommitted",
        group_id=None,
        # kafka-python 2.x's 1 MB frame limit is below one fetch response of a busy topic: it drops the
        # connection ("Invalid frame length") and fetches again
        receive_message_max_bytes=100_000_000,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
            if check is not None:
                check()
            time.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list = []
        seen: set[tuple[int, int]] = set()  # one record, one position: counted once however often read
        while len(records) < expected and time.monotonic() < deadline:
            if check is not None:
                check()
            for batch in consumer.poll(timeout_ms=500).values():
                fresh = [r for r in batch if (r.partition, r.offset) not in seen]
                seen.update((r.partition, r.offset) for r in fresh)
                records.extend(fresh)
        return records
    finally:
        consumer.close()


def random_events(
    rng: np.random.Generator, streams: int, events: int, features: int
) -> list[tuple[str, np.ndarray]]:
    """``events`` single-timestep events over ``streams`` streams in random interleaving."""
    ids = rng.integers(0, streams, size=events)
    xs = rng.standard_normal((events, features)).astype(np.float32)
    return [(f"stream-{i}", x) for i, x in zip(ids, xs, strict=True)]


def offline_outputs(model: StreamModel, events: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each stream's outputs from running the model over its whole sequence at once."""
    per_stream: dict[str, list[np.ndarray]] = defaultdict(list)
    for sid, x in events:
        per_stream[sid].append(x)
    out = {}
    with torch.no_grad():
        for sid, xs in per_stream.items():
            y, _ = model(torch.from_numpy(np.stack(xs)).unsqueeze(1))
            out[sid] = y[:, 0].numpy()
    return out


def outputs_by_stream(records) -> tuple[dict[str, list], dict[tuple[int, int], int]]:
    """Output records de-duplicated by input (partition, offset), ordered by offset per stream; also
    how many times each input position was answered."""
    seen: dict[tuple[int, int], dict] = {}
    answered: dict[tuple[int, int], int] = defaultdict(int)
    for rec in records:
        doc = json.loads(rec.value)
        pos = (doc["partition"], doc["offset"])
        answered[pos] += 1
        seen[pos] = {"key": rec.key.decode(), **doc}
    by_stream: dict[str, list] = defaultdict(list)
    for pos in sorted(seen):
        by_stream[seen[pos]["key"]].append(seen[pos])
    return by_stream, dict(answered)


@pytest.fixture(params=["kafka-python", "confluent-kafka"])
def service(request, kafka_cluster, tmp_path):
    """A service run against the session broker, once per client library."""
    model, path = make_model(tmp_path)
    topic = f"in-{uuid.uuid4().hex[:8]}"
    run = ServiceRun(kafka_cluster.bootstrap, tmp_path, model, path, topic, f"g-{topic}", partitions=4)
    run.library = request.param
    create_topic(kafka_cluster.bootstrap, topic, run.partitions)
    yield run
    run.stop_all()


def end_offsets_total(bootstrap: str, topic: str) -> int:
    """Sum of the topic's partition end offsets (records written, transaction markers included)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        return sum(consumer.end_offsets(tps).values()) if tps else 0
    finally:
        consumer.close()


def committed_total(bootstrap: str, group: str) -> int:
    """Sum of the group's committed input offsets (events whose processing is durably checkpointed)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_consumer_group_offsets(group)
        return sum(o.offset for o in offsets.values() if o.offset >= 0)
    finally:
        admin.close()


@pytest.fixture(scope="session")
def kafka_helpers(kafka_starter):
    """The helpers above, for test modules (which cannot import this conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        produce=produce,
        produce_paced=produce_paced,
        consume_all=consume_all,
        random_events=random_events,
        offline_outputs=offline_outputs,
        outputs_by_stream=outputs_by_stream,
        create_topic=create_topic,
        end_offsets_total=end_offsets_total,
        committed_total=committed_total,
        start_kafka=kafka_starter,
        make_model=make_model,
        ServiceRun=ServiceRun,
    )
