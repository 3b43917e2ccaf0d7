"""Sensor pipeline benchmark (``rnnstream bench sensors``).

1. **Throughput**: readings/s through the whole pipeline (CSV source → decode → reading checks → online
   normalisation → LSTM forecaster → anomaly score → null sink) for 10,000 concurrent streams, in this
   process, with the shipped config's settings (``configs/sensors-csv.yaml``); with the fine-tuning worker
   off and on. Baseline, in the same run: what a user writes without rnnstream: ``csv.DictReader``, a
   dict of per-stream ``(h, c)`` and one ``nn.LSTMCell`` + head call per reading, with the same online
   normalisation and score, in plain Python.
2. **Latency**: MQTT publish → score received, through a real Mosquitto, with the real ``rnnstream run
   configs/sensors-mqtt.yaml`` service as a subprocess, 1,000 streams at 10,000 readings/s offered
   open-loop by a publisher process (QoS 1). Each reading's ``ts`` is its scheduled send time; an
   observer process subscribed to ``scores/+`` takes ``receive time - ts`` (no coordinated omission; a
   reading never answered counts as infinitely late). Baseline, in the same run: a plain paho relay
   (``on_message`` → publish the payload unchanged), the floor set by the broker and the Python client.

The machine (CPU model, cores, torch version) is printed with the tables; results go to
``results/sensors_bench.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.table import Table

from benchmarks.engine_bench import machine_info
from benchmarks.report import bench_console, publish

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "assets" / "sensor_lstm.safetensors"
DEFAULT_JSON = Path("results/sensors_bench.json")
T0 = 1_700_000_000
PAHO_INFLIGHT = 100
"""paho's in-flight window for the load generators: paho rescans its in-flight messages on every
acknowledgement, so a large window collapses QoS 1 throughput (measured here, 30,000 publishes: 22.8k/s
acknowledged with 100 in flight, 8.4k/s with 1,000, 1.2k/s with 20,000)."""
PUBLISHERS = 2
"""Publisher processes; each offers ``rate / PUBLISHERS`` readings/s of its own streams."""


# ---- 1: throughput ---------------------------------------------------------------------------------------
def write_readings(path: Path, streams: int, per_stream: int, seed: int = 0) -> int:
    """A CSV ``timestamp,sensor,value`` of ``streams`` noisy sines, interleaved by time; returns rows."""
    rng = np.random.default_rng(seed)
    period = rng.uniform(10, 60, streams)
    phase = rng.uniform(0, 2 * np.pi, streams)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["timestamp", "sensor", "value"])
        for t in range(per_stream):
            values = 20 + 5 * np.sin(2 * np.pi * t / period + phase) + rng.normal(0, 0.2, streams)
            ts = str(T0 + 60 * t)
            out.writerows([ts, f"sensor-{s}", f"{v:.4f}"] for s, v in enumerate(values))
    return streams * per_stream


def pipeline_config(workdir: Path, data: Path, finetune: bool) -> Path:
    """``configs/sensors-csv.yaml`` on ``data``, into a null sink."""
    cfg = yaml.safe_load((REPO / "configs" / "sensors-csv.yaml").read_text())
    cfg["model"] = str(MODEL)
    cfg["source"].update(paths=[str(data)], stream_column="sensor", speed=None)
    cfg["sink"] = {"type": "null"}
    cfg["dead_letters"] = {"type": "file", "path": str(workdir / "dlq.jsonl")}
    cfg["engine"] = {"device": "cpu", "capacity": 16_384}
    if finetune:
        cfg["finetune"] = {"target": "next", "k1": 8, "k2": 16, "versions_dir": str(workdir / "versions")}
    path = workdir / f"bench-{'ft' if finetune else 'plain'}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pipeline_rate(config: Path, rows: int) -> dict[str, float]:
    """Run the pipeline over the file once; readings/s from the first to the last reading."""
    from rnnstream.config import load_config
    from rnnstream.service import build_pipeline

    pipeline = build_pipeline(load_config(config))
    start = time.perf_counter()
    pipeline.run()
    wall = time.perf_counter() - start
    c = pipeline.counters
    assert c.outputs == rows, f"{c.outputs} outputs for {rows} readings ({c.dead_letters} dead letters)"
    return {"readings": rows, "seconds": wall, "readings_per_s": rows / wall}


def naive_rate(data: Path, limit: int) -> dict[str, float]:
    """The baseline: plain Python over the CSV, one ``nn.LSTMCell`` step per reading."""
    from models import load_bundle

    bundle = load_bundle(MODEL)
    lstm = bundle.layers[0]
    cell = torch.nn.LSTMCell(1, lstm.hidden_size)
    with torch.no_grad():
        cell.weight_ih.copy_(lstm.weight_ih)
        cell.weight_hh.copy_(lstm.weight_hh)
        cell.bias_ih.copy_(lstm.bias_ih)
        cell.bias_hh.copy_(lstm.bias_hh)
    head = bundle.head
    norm = bundle.info.features["normalisation"]
    state: dict[str, Any] = {}
    torch.set_num_threads(1)
    start = time.perf_counter()
    n = 0
    with open(data, newline="") as f, torch.no_grad():
        for row in csv.DictReader(f):
            n += 1
            if n > limit:
                break
            value = float(row["value"])
            sid = row["sensor"]
            s = state.get(sid)
            if s is None:
                s = state[sid] = {
                    "h": None,
                    "n": 0,
                    "mean": 0.0,
                    "var": 0.0,
                    "pred": 0.0,
                    "mu": 0.0,
                    "ev": 0.0,
                }
            std = max(math.sqrt(s["var"]), 1e-3 * abs(s["mean"]) + 1e-6)
            z = (value - s["mean"]) / std if s["n"] else 0.0
            err = abs(z - s["pred"])
            _score = 0.5 * (1 + math.erf((err - s["mu"]) / math.sqrt(s["ev"] + 1e-12) / math.sqrt(2)))
            a = max(1 / (s["n"] + 1), 1e-3)
            d = value - s["mean"]
            s["mean"] += a * d
            s["var"] = (1 - a) * (s["var"] + a * d * d)
            s["mu"] += a * (err - s["mu"])
            s["ev"] = (1 - a) * (s["ev"] + a * (err - s["mu"]) ** 2)
            s["n"] += 1
            x = torch.tensor([[z * norm["std"] + norm["mean"]]], dtype=torch.float32)
            h, c = cell(x, s["h"])
            s["h"] = (h, c)
            s["pred"] = (float(head(h)[0, 0]) - norm["mean"]) / norm["std"]
    wall = time.perf_counter() - start
    done = min(n, limit)
    return {"readings": done, "seconds": wall, "readings_per_s": done / wall}


def throughput(quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    streams = 10_000
    per_stream = 5 if quick else 30
    with tempfile.TemporaryDirectory(prefix="rnnstream-bench-") as tmp:
        work = Path(tmp)
        data = work / "readings.csv"
        rows = write_readings(data, streams, per_stream)
        progress(f"throughput: {rows:,} readings of {streams:,} streams")
        out: dict[str, Any] = {"streams": streams, "readings": rows}
        out["pipeline"] = pipeline_rate(pipeline_config(work, data, finetune=False), rows)
        progress(f"pipeline: {out['pipeline']['readings_per_s']:,.0f} readings/s; with fine-tuning ...")
        out["pipeline_finetune"] = pipeline_rate(pipeline_config(work, data, finetune=True), rows)
        out["naive"] = naive_rate(data, limit=min(rows, 30_000))
        progress(f"naive loop: {out['naive']['readings_per_s']:,.0f} readings/s")
    return out


# ---- 2: MQTT latency -------------------------------------------------------------------------------------
def _publisher(address: str, rate: float, seconds: float, streams: list[str], ready: Any) -> None:
    """Publish ``rate`` readings/s for ``seconds`` round-robin over ``streams``, QoS 1; ``ts`` = the
    scheduled send time (seconds since the epoch)."""
    import paho.mqtt.client as mqtt

    host, port = address.rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}")
    client.max_inflight_messages_set(PAHO_INFLIGHT)
    client.max_queued_messages_set(0)
    client.connect(host, int(port))
    client.loop_start()
    ready.wait()
    start = time.time() + 0.2
    n = int(rate * seconds)
    slice_s = 0.002
    i = 0
    while i < n:
        now = time.time()
        due = min(n, int((now - start) * rate) + 1)
        while i < due:
            scheduled = start + i / rate
            payload = b'{"ts":%.6f,"value":%.4f}' % (scheduled, math.sin(i / 50.0))
            client.publish(f"sensors/{streams[i % len(streams)]}", payload, qos=1)
            i += 1
        time.sleep(slice_s)
    time.sleep(1.0)
    client.loop_stop()
    client.disconnect()


def _observer(address: str, topic: str, expected: int, timeout_s: float, out: Any, subscribed: Any) -> None:
    """Collect ``receive time - ts`` of each message on ``topic`` until ``expected`` or the timeout."""
    import paho.mqtt.client as mqtt

    host, port = address.rsplit(":", 1)
    lat: list[float] = []

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        now = time.time()
        lat.append(now - json.loads(msg.payload)["ts"])

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-obs-{os.getpid()}")
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=0)
    client.connect(host, int(port))
    client.loop_start()
    time.sleep(0.5)
    subscribed.set()
    deadline = time.time() + timeout_s
    while len(lat) < expected and time.time() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    out.put(lat)


def _relay(address: str) -> None:
    """The baseline: subscribe to ``sensors/+``, republish each payload unchanged to ``relay/<stream>``."""
    import paho.mqtt.client as mqtt

    host, port = address.rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-relay")
    client.max_inflight_messages_set(PAHO_INFLIGHT)

    def on_message(c: Any, _u: Any, msg: Any) -> None:
        c.publish("relay/" + msg.topic.split("/", 1)[1], msg.payload, qos=1)

    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe("sensors/+", qos=1)
    client.connect(host, int(port))
    client.loop_forever()


def percentiles(lat: list[float], expected: int) -> dict[str, float]:
    """p50/p99/p99.9/max in ms; missing answers count as infinitely late (nearest rank)."""
    values = np.sort(np.asarray(lat) * 1e3)
    values = np.concatenate([values, np.full(max(0, expected - len(values)), np.inf)])
    out = {}
    for name, q in (("p50", 50), ("p99", 99), ("p999", 99.9)):
        rank = max(1, math.ceil(q / 100 * len(values)))
        out[f"{name}_ms"] = float(values[rank - 1])
    out["max_ms"] = float(values[-1]) if len(values) else math.inf
    out["answered"] = len(lat)
    return out


def _one_latency_run(address: str, topic: str, rate: float, seconds: float, streams: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    expected = int(rate * seconds)
    out, subscribed, ready = ctx.Queue(), ctx.Event(), ctx.Event()
    obs = ctx.Process(target=_observer, args=(address, topic, expected, seconds + 20, out, subscribed))
    obs.start()
    subscribed.wait(30)
    names = [f"s{i}" for i in range(streams)]
    pubs = [
        ctx.Process(
            target=_publisher, args=(address, rate / PUBLISHERS, seconds, names[k::PUBLISHERS], ready)
        )
        for k in range(PUBLISHERS)
    ]
    for pub in pubs:
        pub.start()
    time.sleep(2.0)  # the publishers import and connect
    ready.set()
    lat = out.get(timeout=seconds + 60)
    for pub in pubs:
        pub.join(30)
    obs.join(30)
    warm = int(rate * min(2.0, seconds / 5))  # the first readings wait for warm-up (JIT, first batches)
    lat = lat[warm:]
    return {"offered_per_s": rate, "seconds": seconds, **percentiles(lat, expected - warm)}


RATES = (2_000.0, 5_000.0, 10_000.0)
"""Offered readings/s; the target is at 10,000 (p99 ≤ 10 ms)."""


def latency(quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """Relay and service latencies at each of ``RATES``, against one broker (a fresh service per rate)."""
    from rnnstream.mqtt_broker import start_broker

    seconds, streams = (4.0 if quick else 10.0), 1_000
    rates = RATES[-1:] if quick else RATES
    runs: dict[str, list[dict[str, Any]]] = {"relay": [], "rnnstream": []}
    with tempfile.TemporaryDirectory(prefix="rnnstream-bench-mqtt-") as tmp:
        work = Path(tmp)
        broker = start_broker(work / "mqtt")
        try:
            ctx = mp.get_context("spawn")
            for rate in rates:
                progress(f"latency at {rate:,.0f} readings/s: plain paho relay")
                relay = ctx.Process(target=_relay, args=(broker.address,), daemon=True)
                relay.start()
                time.sleep(1.0)
                runs["relay"].append(_one_latency_run(broker.address, "relay/+", rate, seconds, streams))
                relay.terminate()
                relay.join(10)
                progress(f"latency at {rate:,.0f} readings/s: rnnstream run configs/sensors-mqtt.yaml")
                svc = _start_service(work / f"svc-{int(rate)}", broker.address)
                try:
                    runs["rnnstream"].append(
                        _one_latency_run(broker.address, "scores/+", rate, seconds, streams)
                    )
                finally:
                    svc.terminate()
                    svc.wait(60)
        finally:
            broker.stop()
    return {"streams": streams, **runs}


def _start_service(work: Path, address: str) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((REPO / "configs" / "sensors-mqtt.yaml").read_text())
    cfg["model"] = str(MODEL)
    cfg["checkpoint"]["dir"] = str(work / "state")
    cfg["mqtt"]["client_id"] = f"bench-{os.getpid()}-{work.name}"  # a session of its own per run
    cfg["engine"] = {"device": "cpu"}
    path = work / "sensors-mqtt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(work / "service.log", "wb")  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnstream.cli", "run", str(path), "--broker", address], stdout=log, stderr=log
    )
    deadline = time.monotonic() + 60
    while b"assigned partitions" not in (work / "service.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the service did not start:\n{(work / 'service.log').read_text()[-3000:]}")
        time.sleep(0.1)
    time.sleep(0.5)
    return proc


# ---- tables ----------------------------------------------------------------------------------------------
def render_tables(results: dict[str, Any]) -> list[Table]:
    tables = []
    t = results.get("throughput")
    if t:
        tt = Table(title=f"Sensor pipeline throughput, {t['streams']:,} streams, CSV → null sink")
        for col in ("pipeline", "readings", "seconds", "readings/s", "vs naive loop"):
            tt.add_column(col, justify="right" if col != "pipeline" else "left")
        naive = t["naive"]["readings_per_s"]
        for name, key in (
            ("rnnstream", "pipeline"),
            ("rnnstream + fine-tuning", "pipeline_finetune"),
            ("naive loop", "naive"),
        ):
            r = t[key]
            rate = r["readings_per_s"]
            mark = "" if key == "naive" else (" ✓" if rate >= 50_000 else " ✗")
            tt.add_row(
                name,
                f"{r['readings']:,}",
                f"{r['seconds']:.2f}",
                f"{rate:,.0f}{mark}",
                f"{rate / naive:.1f}×",
            )
        tables.append(tt)
    lat = results.get("latency")
    if lat:
        lt = Table(title=f"MQTT publish → score received, {lat['streams']:,} streams, QoS 1, real Mosquitto")
        for col in ("path", "offered/s", "answered", "p50 ms", "p99 ms", "p99.9 ms", "max ms"):
            lt.add_column(col, justify="right" if col != "path" else "left")
        paths = (("plain paho relay (floor)", "relay"), ("rnnstream run sensors-mqtt.yaml", "rnnstream"))
        for name, key in paths:
            for r in lat[key]:
                target = r["offered_per_s"] >= 10_000 and key == "rnnstream"
                mark = (" ✓" if r["p99_ms"] <= 10 else " ✗") if target else ""
                lt.add_row(
                    name,
                    f"{r['offered_per_s']:,.0f}",
                    f"{r['answered']:,}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}{mark}",
                    f"{r['p999_ms']:.2f}",
                    f"{r['max_ms']:.2f}",
                )
        tables.append(lt)
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    parser.add_argument("--only", choices=("throughput", "latency"), default=None)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    console = bench_console()
    progress = lambda m: console.print(f"[dim]… {m}[/]")  # noqa: E731
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(torch.device("cpu"))}
    if args.only in (None, "throughput"):
        results["throughput"] = throughput(args.quick, progress)
    if args.only in (None, "latency"):
        results["latency"] = latency(args.quick, progress)
    results["elapsed_s"] = time.perf_counter() - started
    publish(console, render_tables(results), results, args.json)
    m = results["machine"]
    console.print(f"[dim]{m['cpu_model']}, {m['logical_cores']} cores, torch {m['torch']}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
