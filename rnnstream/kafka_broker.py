"""Local Apache Kafka (KRaft) broker launcher for development and integration tests.

Standard library only.  The broker jars come from Maven Central through the tiny
``tools/kafka/pom.xml`` project and are cached outside the repository (default
``~/.cache/rnnstream/kafka-<version>/lib``, override with ``RNNSTREAM_KAFKA_HOME``), so only
the first :func:`ensure_jars` call needs the network.

Two levels of API:

* :func:`start_cluster` starts 1..N combined-mode (``process.roles=broker,controller``) nodes on
  free 127.0.0.1 ports and returns a :class:`Cluster` (also a context manager).
* :func:`up` / :func:`down` / :func:`status` record the cluster in a JSON state file
  (default ``~/.cache/rnnstream/kafka-run/cluster.json``, override the directory with
  ``RNNSTREAM_KAFKA_RUN_DIR``) so separate processes (``rnnstream kafka up`` / ``down``) can
  share one long-lived cluster.

Every node has two client listeners: ``PLAINTEXT`` (:attr:`Cluster.bootstrap`) and ``SASL_SSL``
(:attr:`Cluster.tls_bootstrap`): TLS with a throwaway CA and server certificate made at each start
(:mod:`rnnstream.local_tls`, files in ``BASE_DIR/tls``; the PKCS#12 keystore is what Kafka reads), and
SASL/PLAIN for the one user :data:`rnnstream.local_tls.USERNAME` whose password is in
:attr:`Cluster.password_file`. Brokers and controllers talk to each other over plaintext. A client over TLS
(kafka-python names; confluent-kafka's in brackets)::

    security_protocol: SASL_SSL          # security.protocol
    ssl_cafile: BASE_DIR/tls/ca.pem      # ssl.ca.location
    sasl_mechanism: PLAIN                # sasl.mechanism
    sasl_plain_username: rnnstream       # sasl.username
    sasl_plain_password: <the password>  # sasl.password
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnstream.local_services import (
    Children,
    cache_dir,
    free_ports,
    is_our_process,
    port_open,
    read_state,
    send_signal,
    spawn,
    state_lock,
    tail,
    wait_gone,
    write_state,
)
from rnnstream.local_tls import USERNAME, TlsFiles, TlsSetupError, make_tls_files

KAFKA_VERSION = "4.1.1"
"""Kafka version collected by ``tools/kafka/pom.xml`` (passed to mvn as ``-Dkafka.version``)."""

MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
READY_LINE = "Kafka Server started"
STATE_FILE_NAME = "cluster.json"
_COMPLETE_MARKER = ".complete"
_POM = Path(__file__).resolve().parent.parent / "tools" / "kafka" / "pom.xml"
_CHILDREN: Children = {}
"""Broker JVMs started by this process, kept so they can be reaped (no zombies, no ResourceWarning)."""


class KafkaBrokerError(RuntimeError):
    """Raised when the broker jars cannot be collected or a broker fails to start."""


# --------------------------------------------------------------------------- paths


def kafka_home() -> Path:
    """Cache directory holding ``lib/`` with the broker jars (``$RNNSTREAM_KAFKA_HOME`` wins)."""
    return cache_dir("RNNSTREAM_KAFKA_HOME", f"kafka-{KAFKA_VERSION}")


def run_dir() -> Path:
    """Directory for the ``up``/``down`` state file and cluster data (``$RNNSTREAM_KAFKA_RUN_DIR``)."""
    return cache_dir("RNNSTREAM_KAFKA_RUN_DIR", "kafka-run")


def state_file() -> Path:
    """Path of the JSON file describing the cluster started by :func:`up`."""
    return run_dir() / STATE_FILE_NAME


# --------------------------------------------------------------------------- jars


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KafkaBrokerError(
            f"'{name}' not found on PATH; the local Kafka broker needs a Java 17+ JDK and Maven "
            f"(e.g. apt-get install -y openjdk-17-jdk-headless maven)"
        )
    return path


def _jars_complete(lib: Path) -> bool:
    marker = lib / _COMPLETE_MARKER
    if not marker.is_file() or marker.read_text().strip() != KAFKA_VERSION:
        return False
    return (lib / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()


def ensure_jars() -> Path:
    """Return the directory with the Kafka broker jars, collecting them with Maven if needed.

    Idempotent: once the cache is complete (marker file present) no Maven call is made, so
    later calls are instant and work offline.
    """
    lib = kafka_home() / "lib"
    if _jars_complete(lib):
        return lib
    mvn = _require_tool("mvn")
    _require_tool("java")
    if not _POM.is_file():
        raise KafkaBrokerError(f"Maven project {_POM} is missing (run from a source checkout)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="lib-", dir=lib.parent))
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(_POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        f"-Dkafka.version={KAFKA_VERSION}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        output = (proc.stdout + proc.stderr)[-4000:]
        raise KafkaBrokerError(f"collecting Kafka jars failed ({' '.join(cmd)}):\n{output}")
    (staging / _COMPLETE_MARKER).write_text(KAFKA_VERSION + "\n")
    if lib.exists():
        shutil.rmtree(lib, ignore_errors=True)
    try:
        staging.rename(lib)
    except OSError:  # a concurrent ensure_jars() won the race
        shutil.rmtree(staging, ignore_errors=True)
    if not _jars_complete(lib):
        raise KafkaBrokerError(f"Kafka jar cache {lib} is incomplete after Maven run")
    return lib


# --------------------------------------------------------------------------- processes


def _runs_kafka(argv: list[bytes]) -> bool:
    """True if the command line ``argv`` runs the Kafka broker main class."""
    return MAIN_CLASS.encode() in argv


# --------------------------------------------------------------------------- cluster


@dataclass
class Node:
    """One combined broker+controller KRaft node."""

    node_id: int
    port: int
    controller_port: int
    config: Path
    log_file: Path
    pid: int = 0
    tls_port: int = 0  # the SASL_SSL listener (0: none, a cluster recorded before it existed)

    def alive(self) -> bool:
        """True while this node's JVM is running."""
        return self.pid > 0 and is_our_process(self.pid, self.config, _runs_kafka, _CHILDREN)


@dataclass
class Cluster:
    """A running local Kafka cluster; ``stop()`` it or use it as a context manager."""

    bootstrap: str
    base_dir: Path
    nodes: list[Node]
    cluster_id: str = ""

    @property
    def tls_bootstrap(self) -> str:
        """``host:port,...`` of the ``SASL_SSL`` listeners (TLS + SASL/PLAIN)."""
        return ",".join(f"127.0.0.1:{n.tls_port}" for n in self.nodes)

    @property
    def tls(self) -> TlsFiles:
        """This cluster's CA certificate (``tls.ca_file``), server certificate and client password."""
        return TlsFiles(self.base_dir / "tls")

    @property
    def username(self) -> str:
        """The SASL/PLAIN user of the ``SASL_SSL`` listeners."""
        return USERNAME

    @property
    def password_file(self) -> Path:
        """The file holding the SASL/PLAIN password (``${file:...}`` in a config)."""
        return self.tls.password_file

    @property
    def pids(self) -> list[int]:
        """Process ids of the node JVMs, in node-id order."""
        return [n.pid for n in self.nodes]

    @property
    def log_files(self) -> list[Path]:
        """Broker log files (stdout+stderr of each JVM), in node-id order."""
        return [n.log_file for n in self.nodes]

    def alive(self) -> list[bool]:
        """Liveness of each node, in node-id order."""
        return [n.alive() for n in self.nodes]

    def is_running(self) -> bool:
        """True if every node is alive."""
        return all(self.alive())

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM all nodes, wait up to ``timeout`` seconds, then SIGKILL the stragglers."""
        live = [n.pid for n in self.nodes if n.alive()]
        for pid in live:
            send_signal(pid, signal.SIGTERM)
        for pid in wait_gone(live, timeout, _CHILDREN):
            send_signal(pid, signal.SIGKILL)
        wait_gone(live, 5.0, _CHILDREN)

    def kill_broker(self, index: int) -> None:
        """SIGKILL node ``index`` (hard failure, for fault-tolerance tests) and wait for it."""
        node = self.nodes[index]
        if node.alive():
            send_signal(node.pid, signal.SIGKILL)
            wait_gone([node.pid], 10.0, _CHILDREN)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable description (used by the ``up``/``down`` state file)."""
        return {
            "kafka_version": KAFKA_VERSION,
            "bootstrap": self.bootstrap,
            "base_dir": str(self.base_dir),
            "cluster_id": self.cluster_id,
            "nodes": [
                {
                    "node_id": n.node_id,
                    "port": n.port,
                    "controller_port": n.controller_port,
                    "tls_port": n.tls_port,
                    "config": str(n.config),
                    "log_file": str(n.log_file),
                    "pid": n.pid,
                }
                for n in self.nodes
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cluster:
        """Inverse of :meth:`to_json`."""
        nodes = [
            Node(
                node_id=n["node_id"],
                port=n["port"],
                controller_port=n["controller_port"],
                tls_port=n.get("tls_port", 0),
                config=Path(n["config"]),
                log_file=Path(n["log_file"]),
                pid=n["pid"],
            )
            for n in data["nodes"]
        ]
        return cls(
            bootstrap=data["bootstrap"],
            base_dir=Path(data["base_dir"]),
            nodes=nodes,
            cluster_id=data.get("cluster_id", ""),
        )

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tls_properties(tls: TlsFiles) -> dict[str, object]:
    """The ``SASL_SSL`` listener's settings: the PKCS#12 keystore and SASL/PLAIN with one user."""
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_{USERNAME}="{tls.password()}";'
    )
    return {
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": tls.keystore,
        "ssl.keystore.password": tls.keystore_password(),
        "sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_ssl.plain.sasl.jaas.config": jaas,
    }


def _server_properties(node: Node, voters: str, data_dir: Path, brokers: int, tls: TlsFiles) -> str:
    rf = 1 if brokers < 3 else 3
    min_isr = 1 if brokers < 3 else 2
    plain, tls_listener = f"PLAINTEXT://127.0.0.1:{node.port}", f"SASL_SSL://127.0.0.1:{node.tls_port}"
    props = {
        "process.roles": "broker,controller",
        "node.id": node.node_id,
        "controller.quorum.voters": voters,
        "listeners": f"{plain},CONTROLLER://127.0.0.1:{node.controller_port},{tls_listener}",
        "advertised.listeners": f"{plain},{tls_listener}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
        "log.dirs": data_dir,
        "num.partitions": 1,
        "default.replication.factor": rf,
        "auto.create.topics.enable": "true",
        "group.initial.rebalance.delay.ms": 0,
        "offsets.topic.replication.factor": rf,
        "offsets.topic.num.partitions": 8,
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": 8,
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": min_isr,
        **_tls_properties(tls),
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _java(lib: Path, jvm_opts: list[str], main: str, *args: str) -> list[str]:
    java = shutil.which("java") or "java"
    return [java, "-Djava.awt.headless=true", *jvm_opts, "-cp", f"{lib}/*", main, *args]


def _run_storage_tool(lib: Path, *args: str) -> str:
    # short-lived JVM: C1 only + serial GC roughly halves its start-up cost
    opts = ["-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
    proc = subprocess.run(
        _java(lib, opts, STORAGE_TOOL, *args), capture_output=True, text=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        raise KafkaBrokerError(f"StorageTool {args[0]} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout.strip()


def _prepare_nodes(base_dir: Path, brokers: int) -> list[Node]:
    ports = free_ports(3 * brokers)
    try:
        tls = make_tls_files(base_dir / "tls")
    except TlsSetupError as exc:
        raise KafkaBrokerError(str(exc)) from exc
    nodes = []
    for i in range(brokers):
        node_dir = base_dir / f"node-{i}"
        node_dir.mkdir(parents=True, exist_ok=True)
        nodes.append(
            Node(
                node_id=i,
                port=ports[2 * i],
                controller_port=ports[2 * i + 1],
                tls_port=ports[2 * brokers + i],
                config=node_dir / "server.properties",
                log_file=node_dir / "server.log",
            )
        )
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in nodes)
    for n in nodes:
        data_dir = n.config.parent / "data"
        shutil.rmtree(data_dir, ignore_errors=True)
        if n.log_file.exists():  # keep one previous log; readiness must only see this run's lines
            n.log_file.replace(n.log_file.with_name(n.log_file.name + ".1"))
        n.config.touch(mode=0o600)  # holds the keystore and SASL passwords
        n.config.write_text(_server_properties(n, voters, data_dir, brokers, tls))
    return nodes


def _format_storage(lib: Path, nodes: list[Node]) -> str:
    cluster_id = _run_storage_tool(lib, "random-uuid").splitlines()[-1].strip()
    configs = [str(n.config) for n in nodes]
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:  # one JVM per node, in parallel
        list(pool.map(lambda cfg: _run_storage_tool(lib, "format", "-t", cluster_id, "-c", cfg), configs))
    return cluster_id


def _launch(lib: Path, node: Node, heap: str) -> None:
    # Kafka's own launcher settings (kafka-run-class.sh: G1 with a 20 ms pause goal; kafka-server-start.sh:
    # a fixed-size heap). With G1's default 200 ms goal, young pauses on a 512 MB heap took ~17 ms on
    # average and showed up in the end-to-end latency tail. ``$RNNSTREAM_KAFKA_JVM_OPTS`` adds options
    # (e.g. ``-Xlog:gc:file=gc.log``).
    opts = [
        f"-Xmx{heap}",
        f"-Xms{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        *os.environ.get("RNNSTREAM_KAFKA_JVM_OPTS", "").split(),
        "-Dorg.slf4j.simpleLogger.showDateTime=true",
        "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss,SSS",
        "-Dorg.slf4j.simpleLogger.logFile=System.out",
    ]
    cmd = _java(lib, opts, MAIN_CLASS, str(node.config))
    node.pid = spawn(cmd, node.log_file, node.config.parent, _CHILDREN)


def _wait_ready(nodes: list[Node], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending:
        for n in list(pending):
            if not n.alive():
                raise KafkaBrokerError(
                    f"Kafka node {n.node_id} exited during startup; log {n.log_file}:\n{tail(n.log_file)}"
                )
            ports_open = port_open(n.port, timeout=1.0) and port_open(n.tls_port, timeout=1.0)
            if READY_LINE in n.log_file.read_text(errors="replace") and ports_open:
                pending.remove(n)
        if pending and time.monotonic() > deadline:
            n = pending[0]
            raise KafkaBrokerError(
                f"Kafka node {n.node_id} not ready after {timeout:.0f}s; "
                f"log {n.log_file}:\n{tail(n.log_file)}"
            )
        if pending:
            time.sleep(0.1)


def start_cluster(
    brokers: int = 1, base_dir: Path | None = None, heap: str = "1g", timeout: float = 90.0
) -> Cluster:
    """Start ``brokers`` KRaft combined-mode nodes on free 127.0.0.1 ports and wait until ready.

    ``base_dir`` (default: a fresh temp dir) receives per-node ``node-<i>/`` with
    ``server.properties``, ``server.log`` and ``data/``; existing data there is wiped and an
    existing ``server.log`` is kept as ``server.log.1``.  Nodes run in their own session, so they
    outlive the calling process until :meth:`Cluster.stop`.  Raises :class:`KafkaBrokerError`
    (with the log tail) on failure.
    """
    if brokers < 1:
        raise ValueError("brokers must be >= 1")
    lib = ensure_jars()
    base = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="rnnstream-kafka-"))
    base = base.resolve()
    nodes = _prepare_nodes(base, brokers)
    cluster_id = _format_storage(lib, nodes)
    bootstrap = ",".join(f"127.0.0.1:{n.port}" for n in nodes)
    cluster = Cluster(bootstrap=bootstrap, base_dir=base, nodes=nodes, cluster_id=cluster_id)
    try:
        for n in nodes:
            _launch(lib, n, heap)
        _wait_ready(nodes, timeout)
    except BaseException:
        cluster.stop(timeout=5.0)
        raise
    return cluster


# --------------------------------------------------------------------------- up / down / status


def _read_state() -> Cluster | None:
    return read_state(state_file(), Cluster.from_json)


def status() -> Cluster | None:
    """The cluster recorded by :func:`up` if all its nodes are still alive, else ``None``."""
    cluster = _read_state()
    return cluster if cluster is not None and cluster.is_running() else None


def up(brokers: int = 1, heap: str = "1g", timeout: float = 90.0) -> Cluster:
    """Start a cluster under :func:`run_dir` and record it, or return the live recorded one.

    A recorded cluster that is only partly alive is stopped and replaced.  Asking for a
    different broker count than the live recorded cluster raises :class:`KafkaBrokerError`.
    """
    with state_lock(run_dir()):
        current = _read_state()
        if current is not None and current.is_running():
            if len(current.nodes) != brokers:
                raise KafkaBrokerError(
                    f"a {len(current.nodes)}-broker cluster is already running at "
                    f"{current.bootstrap}; run 'rnnstream kafka down' first"
                )
            return current
        if current is not None:
            current.stop(timeout=10.0)
        cluster = start_cluster(brokers, base_dir=run_dir() / "cluster", heap=heap, timeout=timeout)
        write_state(state_file(), cluster.to_json())
        return cluster


def down(timeout: float = 20.0) -> bool:
    """Stop the cluster recorded by :func:`up` and forget it; True if any node was running."""
    with state_lock(run_dir()):
        current = _read_state()
        if current is None:
            return False
        was_running = any(current.alive())
        current.stop(timeout=timeout)
        state_file().unlink(missing_ok=True)
        return was_running
