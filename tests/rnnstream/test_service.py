"""``rnnstream run`` end to end, as a real subprocess against real services: the shipped sensor configs,
mixed source/sink pairs, a Mosquitto kill -9, a crash of the service itself, and every messy-input case."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.connectors.conftest import consume_all

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "models" / "assets" / "sensor_lstm.safetensors"

pytestmark = [pytest.mark.integration]


def write_config(tmp_path: Path, base: str, name: str = "run.yaml", **sections) -> Path:
    """A copy of ``configs/<base>`` with the model's absolute path, state under ``tmp_path``, and
    ``sections`` replacing (dicts: updating) the top-level sections."""
    cfg = yaml.safe_load((REPO / "configs" / base).read_text())
    cfg["model"] = str(ASSET)
    cfg.setdefault("checkpoint", {})["dir"] = str(tmp_path / "state")
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and "type" not in value:
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


class Service:
    """``rnnstream run CONFIG [args]`` as a subprocess; stdout and stderr kept in files."""

    def __init__(self, config: Path, *args: str) -> None:
        self.out = config.with_suffix(".out")
        self.err = config.with_suffix(".err")
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rnnstream.cli", "run", str(config), *args],
                cwd=REPO,
                stdout=out,
                stderr=err,
                env={**os.environ, "COLUMNS": "200"},
            )

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def log(self) -> str:
        return self.err.read_text(errors="replace")[-6000:]

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_for(predicate, timeout: float, what: str, service: Service | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if service is not None and not service.alive():
            raise AssertionError(
                f"service exited {service.proc.returncode} while waiting for {what}:\n{service.log()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f":\n{service.log()}" if service else ""))
        time.sleep(0.05)


def jsonl(path: Path, torn: int = 2) -> list[dict]:
    """The documents of a JSON-lines file; at most ``torn`` lines may be cut short (a process killed in
    the middle of a write)."""
    if not path.exists():
        return []
    docs, bad = [], []
    for line in path.read_text().splitlines():
        try:
            docs.append(json.loads(line))
        except ValueError:
            bad.append(line)
    assert len(bad) <= torn, bad
    return docs


# ---- CSV ------------------------------------------------------------------------------------------------
def test_the_shipped_csv_config_runs_as_is_to_stdout():
    proc = subprocess.run(
        [sys.executable, "-m", "rnnstream.cli", "run", "configs/sensors-csv.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    with open(REPO / "configs" / "data" / "machines.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(docs) == len(rows)
    assert Counter(d["stream"] for d in docs) == Counter(r["machine"] for r in rows)
    for d in docs:
        assert 0.0 <= d["anomaly_score"] <= 1.0 and isinstance(d["alert"], bool)
        assert {"ts", "value", "prediction", "forecast", "error"} <= set(d)
    spike = [d for d in docs if d["stream"] == "pump-1"][600]
    assert spike["alert"], spike  # the shipped file's spike (scripts/make_sample_sensors.py)


def _sensor_csv(path: Path, streams: int, rows: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    t0 = 1_700_000_000
    out = []
    for t in range(rows):
        for s in range(streams):
            value = 10 * np.sin(2 * np.pi * t / (20 + s)) + rng.normal(0, 0.3)
            out.append({"timestamp": str(t0 + 60 * t), "sensor": f"s{s}", "value": f"{value:.4f}"})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["timestamp", "sensor", "value"])
        w.writeheader()
        w.writerows(out)
    return out


def _csv_to_jsonl(tmp_path: Path, data: Path, out: Path, speed: float | None, name: str) -> Path:
    return write_config(
        tmp_path,
        "sensors-csv.yaml",
        name=name,
        source={
            "type": "csv",
            "paths": [str(data)],
            "stream_column": "sensor",
            "channels": ["value"],
            "speed": speed,
        },
        sink={"type": "jsonl", "path": str(out)},
        dead_letters={"type": "file", "path": str(tmp_path / f"{name}.dlq.jsonl")},
        checkpoint={"interval_ms": 100, "dir": str(tmp_path / f"state-{name}")},
    )


def test_csv_replay_killed_mid_run_restarts_from_its_row_with_nothing_lost_or_applied_twice(tmp_path):
    data = tmp_path / "sensors.csv"
    rows = _sensor_csv(data, streams=20, rows=150)
    clean = Service(_csv_to_jsonl(tmp_path, data, tmp_path / "clean.jsonl", None, "clean"))
    assert clean.wait(300) == 0, clean.log()
    expected = jsonl(tmp_path / "clean.jsonl")
    assert len(expected) == len(rows)

    out = tmp_path / "crashed.jsonl"
    config = _csv_to_jsonl(tmp_path, data, out, 60.0 * 20, "crashed")  # ~ 450 rows/s: killed mid-run
    for target in (300, 900):
        svc = Service(config)
        wait_for(lambda n=target: len(jsonl(out)) > n, 120, "outputs", svc)
        svc.kill()
    svc = Service(config)
    assert svc.wait(300) == 0, svc.log()
    got = jsonl(out)
    last = {(d["stream"], d["ts"]): d for d in got}  # a replay after a kill answers again: the last counts
    assert len(last) == len(rows)
    for d in expected:
        mine = last[(d["stream"], d["ts"])]
        assert mine["prediction"] == pytest.approx(d["prediction"], abs=1e-4), (mine, d)
        assert mine["anomaly_score"] == pytest.approx(d["anomaly_score"], abs=1e-6), (mine, d)


def test_every_messy_input_case_is_counted_dead_lettered_and_touches_no_other_stream(tmp_path, docs_close):
    """One stream (``victim``) gets every kind of messy input; the other streams' outputs equal those of
    a run without it, and each case lands in the dead letters with its reason."""
    data_clean, data_messy = tmp_path / "clean.csv", tmp_path / "messy.csv"
    rows = _sensor_csv(data_clean, streams=5, rows=200, seed=3)
    t0 = 1_700_000_000
    victim = [{"timestamp": str(t0 + 60 * t), "sensor": "victim", "value": "1.0"} for t in range(120)]
    victim[10]["value"] = ""  # missing value
    victim[20]["value"] = "hot"  # non-numeric
    victim[30]["value"] = "1e308"  # absurd
    victim[40]["value"] = "nan"
    victim[50]["timestamp"] = victim[48]["timestamp"]  # out of order
    victim[61]["timestamp"] = victim[60]["timestamp"]  # duplicate
    victim[70]["timestamp"] = str(t0 + 60 * 70 + 86_400 * 3)  # a gap of 3 days...
    for t in range(71, 120):
        victim[t]["timestamp"] = str(int(victim[70]["timestamp"]) + 60 * (t - 70))
    victim[80]["timestamp"] = "yesterday"  # bad timestamp
    messy = []  # the same clean rows, and the victim's row t after the clean rows of time t (file order)
    for t in range(200):
        messy += rows[5 * t : 5 * t + 5] + (victim[t : t + 1] if t < len(victim) else [])
    with open(data_messy, "w", newline="") as f:
        w = csv.DictWriter(f, ["timestamp", "sensor", "value"])
        w.writeheader()
        w.writerows(messy)
    flat_and_gap = {"max_gap_s": 3600, "on_gap": "keep", "flatline_after": 30}
    outs = {}
    for name, data in (("clean", data_clean), ("messy", data_messy)):
        cfg = _csv_to_jsonl(tmp_path, data, tmp_path / f"{name}.jsonl", None, name)
        cfg_doc = yaml.safe_load(cfg.read_text())
        cfg_doc["readings"] = flat_and_gap
        cfg.write_text(yaml.safe_dump(cfg_doc))
        svc = Service(cfg)
        assert svc.wait(300) == 0, svc.log()
        outs[name] = jsonl(tmp_path / f"{name}.jsonl")
    docs_close([d for d in outs["messy"] if d["stream"] != "victim"], outs["clean"])
    letters = jsonl(tmp_path / "messy.dlq.jsonl")
    reasons = [d["reason"] for d in letters]
    assert all(d["key"] in ("victim", None) or d["raw"].get("sensor") == "victim" for d in letters)
    joined = "\n".join(reasons)
    for words in (
        "missing",
        "not a number",
        "beyond",
        "out of order",
        "duplicate",
        "gap of",
        "flat line",
        "timestamp",
    ):
        assert words in joined, (words, reasons)
    rejected = [r for r in reasons if not r.startswith("accepted")]
    assert len(rejected) == 7, reasons  # missing, non-numeric, 1e308, nan, out of order, duplicate, bad ts
    victim_out = [d for d in outs["messy"] if d["stream"] == "victim"]
    assert len(victim_out) == 120 - 7


# ---- MQTT -----------------------------------------------------------------------------------------------
def _mqtt_config(tmp_path: Path, name: str = "mqtt.yaml", **sections) -> Path:
    return write_config(tmp_path, "sensors-mqtt.yaml", name=name, **sections)


def _publish(broker, topic: str, docs: list[dict], qos: int = 1) -> None:
    """Publish ``docs`` as JSON with a paho client and wait for every acknowledgement. (``mosquitto_pub
    -l -q 1`` exits 0 while dropping most of a long input: it disconnects before its queue is sent.)"""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    client.max_inflight_messages_set(1000)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, json.dumps(d), qos=qos) for d in docs]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published(), "a publish was not acknowledged"
    finally:
        client.loop_stop()
        client.disconnect()


def _mosquitto(tool: str, broker, topic: str, *args: str) -> list[str]:
    """The command line of ``mosquitto_pub``/``mosquitto_sub`` on ``topic`` of ``broker``, QoS 1."""
    return [tool, "-h", broker.host, "-p", str(broker.port), "-t", topic, "-q", "1", *args]


def _mosquitto_pub(broker, topic: str, docs: list[dict]) -> None:
    """One ``mosquitto_pub -q 1 -m`` per message: an independent client."""
    for d in docs:
        subprocess.run(
            _mosquitto("mosquitto_pub", broker, topic, "-m", json.dumps(d)), check=True, timeout=30
        )


def _subscribe(broker, topic: str, count: int, timeout_s: float = 60) -> subprocess.Popen:
    args = ("-C", str(count), "-v", "-W", str(int(timeout_s)))
    return subprocess.Popen(
        _mosquitto("mosquitto_sub", broker, topic, *args), stdout=subprocess.PIPE, text=True
    )


def _wait_subscribed(broker, service: Service) -> None:
    wait_for(
        lambda: "assigned partitions [0]" in service.err.read_text(errors="replace"), 60, "start", service
    )
    time.sleep(0.5)


@pytest.mark.mqtt
def test_mqtt_round_trip_with_independent_clients(tmp_path, mqtt_broker):
    config = _mqtt_config(tmp_path, mqtt={"client_id": f"rt-{time.monotonic_ns()}"})
    svc = Service(config, "--broker", mqtt_broker.address)
    try:
        _wait_subscribed(mqtt_broker, svc)
        n = 60
        sub = _subscribe(mqtt_broker, "scores/+", 3 * n)
        time.sleep(0.5)
        for dev in ("dev1", "dev2", "dev3"):
            _publish(
                mqtt_broker,
                f"sensors/{dev}",
                [{"ts": 1_700_000_000 + t, "value": np.sin(t / 5)} for t in range(n)],
            )
        out, _ = sub.communicate(timeout=90)
    finally:
        assert svc.stop() == 0, svc.log()
    lines = out.splitlines()
    assert len(lines) == 3 * n, svc.log()
    per: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        topic, payload = line.split(" ", 1)
        per[topic].append(json.loads(payload))
    assert set(per) == {"scores/dev1", "scores/dev2", "scores/dev3"}
    for docs in per.values():
        assert [d["ts"] for d in docs] == [1_700_000_000 + t for t in range(n)]  # one each, in order
        for d in docs:
            assert {"ts", "value", "prediction", "anomaly_score", "alert"} <= set(d)
            assert 0.0 <= d["anomaly_score"] <= 1.0


def _mqtt_to_file(tmp_path: Path, broker, name: str, client_id: str) -> tuple[Path, Path]:
    out = tmp_path / f"{name}.jsonl"
    config = _mqtt_config(
        tmp_path,
        name=f"{name}.yaml",
        mqtt={"client_id": client_id, "broker": broker.address},
        sink={"type": "jsonl", "path": str(out)},
        dead_letters={"type": "file", "path": str(tmp_path / f"{name}.dlq.jsonl")},
        checkpoint={"dir": str(tmp_path / f"state-{name}")},
    )
    return config, out


@pytest.mark.mqtt
def test_mosquitto_kill_9_mid_run_loses_no_reading_sent_once_it_is_back(tmp_path, fresh_mqtt_broker):
    broker = fresh_mqtt_broker
    config, out = _mqtt_to_file(tmp_path, broker, "k9", f"k9-{time.monotonic_ns()}")
    svc = Service(config)
    try:
        _wait_subscribed(broker, svc)
        t0 = 1_700_000_000
        before = [{"ts": t0 + t, "value": float(t % 7)} for t in range(100)]
        for dev in ("a", "b"):
            _publish(broker, f"sensors/{dev}", before)
        wait_for(lambda: len(jsonl(out)) >= 200, 60, "the first readings", svc)
        time.sleep(1.5)  # the broker's autosave keeps our session
        broker.kill()
        time.sleep(1.0)
        broker.restart()
        after = [{"ts": t0 + 1000 + t, "value": float(t % 5)} for t in range(300)]
        for dev in ("a", "b"):
            _publish(broker, f"sensors/{dev}", after)
        wait_for(lambda: len(jsonl(out)) >= 800, 90, "the readings sent after the restart", svc)
        time.sleep(1.0)  # anything processed twice would show up now
    finally:
        assert svc.stop() == 0, svc.log()
    got = Counter((d["stream"], d["ts"]) for d in jsonl(out))
    for dev in ("a", "b"):
        for d in after:
            assert got[(dev, d["ts"])] == 1, (dev, d["ts"], got[(dev, d["ts"])])
    assert max(got.values()) == 1


@pytest.mark.mqtt
def test_a_killed_service_gets_its_unacknowledged_readings_again_and_applies_each_once(
    tmp_path, fresh_mqtt_broker
):
    """kill -9 of the service while readings arrive: the broker keeps what was not acknowledged (acks
    follow checkpoints), the restarted service drops what its restored state already holds. The last
    answer for every reading equals a run without the crash."""
    broker = fresh_mqtt_broker
    t0 = 1_700_000_000
    readings = {
        dev: [{"ts": t0 + t, "value": float(np.sin(t / 4 + k))} for t in range(400)]
        for k, dev in enumerate("xyz")
    }
    config, out = _mqtt_to_file(tmp_path, broker, "crash", "crash-svc")
    svc = Service(config)
    _wait_subscribed(broker, svc)
    import threading

    def publish_all() -> None:
        for chunk in range(0, 400, 40):
            for dev, docs in readings.items():
                _publish(broker, f"sensors/{dev}", docs[chunk : chunk + 40])
            time.sleep(0.15)

    pub = threading.Thread(target=publish_all)
    pub.start()
    wait_for(lambda: len(jsonl(out)) > 300, 60, "some outputs", svc)
    svc.kill()
    pub.join()
    svc = Service(config)
    try:
        wait_for(lambda: len({(d["stream"], d["ts"]) for d in jsonl(out)}) >= 1200, 90, "every reading", svc)
    finally:
        assert svc.stop() == 0, svc.log()
    # the same readings in one uninterrupted run (its own broker session), for comparison
    config2, out2 = _mqtt_to_file(tmp_path, broker, "ref", "ref-svc")
    ref = Service(config2)
    try:
        _wait_subscribed(broker, ref)
        for dev, docs in readings.items():
            _publish(broker, f"sensors/{dev}", docs)
        wait_for(lambda: len(jsonl(out2)) >= 1200, 90, "the reference run", ref)
    finally:
        assert ref.stop() == 0, ref.log()
    last = {(d["stream"], d["ts"]): d for d in jsonl(out)}
    for d in jsonl(out2):
        mine = last[(d["stream"], d["ts"])]
        assert mine["prediction"] == pytest.approx(d["prediction"], abs=1e-4), (mine, d)


@pytest.mark.mqtt
def test_serial_line_to_mqtt(tmp_path, mqtt_broker):
    if shutil.which("socat") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("socat not found (CI=true: scripts/system_deps.sh installs it)")
        pytest.skip("socat not found (scripts/system_deps.sh installs it)")
    link_dev, link_app = tmp_path / "dev", tmp_path / "app"
    socat = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={link_dev}", f"pty,raw,echo=0,link={link_app}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: link_dev.exists() and link_app.exists(), 10, "socat's ptys")
        config = write_config(
            tmp_path,
            "sensors-mqtt.yaml",
            source={"type": "serial", "port": str(link_app), "stream_id": "line1", "channels": ["value"]},
            mqtt={"client_id": f"serial-{time.monotonic_ns()}", "broker": mqtt_broker.address},
        )
        svc = Service(config)
        try:
            wait_for(
                lambda: "assigned partitions [0]" in svc.err.read_text(errors="replace"), 60, "start", svc
            )
            sub = _subscribe(mqtt_broker, "scores/line1", 50)
            time.sleep(0.5)
            with open(link_dev, "wb", buffering=0) as dev:
                for t in range(50):
                    dev.write(f"{1_700_000_000 + t},{np.cos(t / 3):.4f}\r\n".encode())
                    if t == 25:
                        dev.write(b"\xff\xfe garbage \x00\n")
            out, _ = sub.communicate(timeout=60)
        finally:
            assert svc.stop() == 0, svc.log()
        docs = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()]
        assert [d["ts"] for d in docs] == [1_700_000_000 + t for t in range(50)]
    finally:
        socat.kill()


# ---- mixed pairs with Kafka -------------------------------------------------------------------------------
@pytest.mark.mqtt
@pytest.mark.kafka
def test_mqtt_to_kafka(tmp_path, mqtt_broker, kafka_cluster):
    topic = f"scores-{time.monotonic_ns()}"
    config = _mqtt_config(
        tmp_path,
        mqtt={"client_id": f"m2k-{time.monotonic_ns()}", "broker": mqtt_broker.address},
        kafka={"bootstrap_servers": kafka_cluster.bootstrap},
        sink={"type": "kafka", "topic": topic},
        dead_letters={"type": "kafka", "topic": f"{topic}-dlq"},
    )
    svc = Service(config)
    try:
        _wait_subscribed(mqtt_broker, svc)
        _publish(mqtt_broker, "sensors/pump", [{"ts": 1_700_000_000 + t, "value": t % 3} for t in range(50)])
        _publish(mqtt_broker, "sensors/pump", [{"ts": "soon", "value": 1}])  # a dead letter
        records = consume_all(kafka_cluster.bootstrap, topic, 50, timeout_s=90)
        letters = consume_all(kafka_cluster.bootstrap, f"{topic}-dlq", 1, timeout_s=90)
    finally:
        assert svc.stop() == 0, svc.log()
    assert len(records) == 50 and {r.key for r in records} == {b"pump"}
    docs = [json.loads(r.value) for r in records]
    assert [d["ts"] for d in docs] == [1_700_000_000 + t for t in range(50)]
    assert len(letters) == 1 and b"timestamp" in dict(letters[0].headers)["reason"]


@pytest.mark.mqtt
@pytest.mark.kafka
def test_kafka_to_mqtt(tmp_path, mqtt_broker, kafka_cluster):
    from kafka import KafkaProducer

    topic = f"readings-{time.monotonic_ns()}"
    config = write_config(
        tmp_path,
        "kafka.yaml",
        kafka={"bootstrap_servers": kafka_cluster.bootstrap},
        source={"type": "kafka", "topics": [topic], "group_id": f"g-{topic}"},
        sink={"type": "mqtt", "topic": f"{topic}/{{stream}}"},
        dead_letters={"type": "file", "path": str(tmp_path / "dlq.jsonl")},
        mqtt={"broker": mqtt_broker.address, "client_id": f"k2m-{time.monotonic_ns()}"},
    )
    sub = _subscribe(mqtt_broker, f"{topic}/+", 40, timeout_s=120)
    svc = Service(config)
    try:
        producer = KafkaProducer(bootstrap_servers=kafka_cluster.bootstrap)
        for t in range(40):
            producer.send(topic, key=f"dev{t % 4}".encode(), value=json.dumps({"x": [float(t)]}).encode())
        producer.send(topic, key=b"dev0", value=b"not json")
        producer.flush()
        producer.close()
        out, _ = sub.communicate(timeout=120)
        wait_for(lambda: len(jsonl(tmp_path / "dlq.jsonl")) == 1, 30, "the dead letter", svc)
    finally:
        assert svc.stop() == 0, svc.log()
    lines = out.splitlines()
    assert len(lines) == 40
    assert {line.split(" ", 1)[0] for line in lines} == {f"{topic}/dev{i}" for i in range(4)}
    docs = [json.loads(line.split(" ", 1)[1]) for line in lines]
    assert all(len(d["y"]) == 1 and d["topic"] == topic for d in docs)


@pytest.mark.kafka
@pytest.mark.parametrize("library", ["kafka-python", "confluent-kafka"])
def test_input_topics_with_different_partition_counts_are_refused_naming_the_key(
    tmp_path, kafka_cluster, library
):
    """State is keyed by partition number: partition 3 of two input topics must be the same task."""
    import subprocess
    import sys

    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    stamp = time.monotonic_ns()
    narrow, wide = f"in2-{stamp}", f"in4-{stamp}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_cluster.bootstrap)
    try:
        admin.create_topics([NewTopic(narrow, 2, 1), NewTopic(wide, 4, 1)])
    finally:
        admin.close()
    config = tmp_path / "two.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(REPO / "models" / "assets" / "sensor_lstm.safetensors"),
                "kafka": {"bootstrap_servers": kafka_cluster.bootstrap, "client_library": library},
                "source": {"type": "kafka", "topics": [narrow, wide], "group_id": f"g-{stamp}"},
                "sink": {"type": "kafka", "topic": f"out-{stamp}"},
            }
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "rnnstream.cli", "run", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "source.topics" in run.stdout and "different partition counts" in run.stdout, run.stdout[-2000:]
