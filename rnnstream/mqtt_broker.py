"""Local Eclipse Mosquitto (MQTT) broker launcher for development and integration tests.

Standard library only; needs the ``mosquitto`` binary (Debian package ``mosquitto``, 2.0.x; see
``scripts/system_deps.sh``).  It is looked up on ``PATH`` and then at ``/usr/sbin/mosquitto``,
which is not on a non-root ``PATH`` on Debian.

Two levels of API, as in :mod:`rnnstream.kafka_broker`:

* :func:`start_broker` writes a config under ``base_dir``, starts one broker on a 127.0.0.1 port
  and returns a :class:`Broker` (``kill`` / ``restart`` / ``stop``; also a context manager).
* :func:`up` / :func:`down` / :func:`status` record the broker in a JSON state file (default
  ``~/.cache/rnnstream/mqtt-run/broker.json``, override the directory with
  ``RNNSTREAM_MQTT_RUN_DIR``) so separate processes (``rnnstream mqtt up`` / ``down``) can share
  one long-lived broker.

The generated ``mosquitto.conf`` contains, and why:

* ``listener PORT 127.0.0.1`` and ``allow_anonymous true``: a loopback-only development broker
  without authentication (mosquitto 2.0 refuses anonymous clients unless told otherwise).
* ``user root`` (only when started as root): mosquitto otherwise drops to the ``mosquitto`` user,
  which cannot write a log or database under a root-owned (e.g. pytest ``tmp_path``, mode 0700)
  directory; it then keeps running *without* a log and without persistence.  Mosquitto logs
  "Warning: Mosquitto should not be run as root/administrator." and carries on.  A non-root user
  needs nothing: mosquitto keeps running as that user.
* ``persistence true`` with ``persistence_location BASE_DIR/data/`` and ``autosave_interval 1``
  (``autosave_on_changes false``: every 1 s): sessions, subscriptions and queued messages are
  written to ``mosquitto.db`` every second, so a broker killed with SIGKILL (``kill -9``) and
  restarted loses at most the last second.  Without the autosave only a clean shutdown writes the
  database.
* ``max_inflight_messages 0``, ``max_queued_messages 0``, ``max_queued_bytes 0`` and no
  ``persistent_client_expiration``: no per-client limit on in-flight or queued QoS 1/2 messages
  (mosquitto's default queue is 1000 messages, silently dropping the rest), so an offline
  persistent session keeps e.g. 100k queued messages.  The price is unbounded broker memory for a
  session that never comes back; this is a development broker.
* ``log_dest file BASE_DIR/mosquitto.log`` with timestamps; the process's stdout/stderr go to the
  same file (errors printed before the config is read).
* ``per_listener_settings true`` and a second listener on ``tls_port``: TLS with a throwaway CA and
  server certificate made at each start (:mod:`rnnstream.local_tls`, files in ``BASE_DIR/tls``) and
  username/password authentication (``allow_anonymous false``, a ``password_file`` written with
  ``mosquitto_passwd`` for the one user :data:`rnnstream.local_tls.USERNAME`, password in
  :attr:`Broker.password_file`). The plaintext listener stays anonymous. A client over TLS (the service's
  ``mqtt`` section)::

      broker: 127.0.0.1:<tls_port>
      username: rnnstream
      password: ${file:BASE_DIR/tls/password}
      tls: {ca_file: BASE_DIR/tls/ca.pem}
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
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

HOST = "127.0.0.1"
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")
"""Where Debian installs the broker (``/usr/sbin`` is often missing from a non-root ``PATH``)."""
PASSWD_FALLBACK = Path("/usr/bin/mosquitto_passwd")
AUTOSAVE_INTERVAL_S = 1
"""Seconds between two writes of the persistence database (the data a SIGKILL can lose)."""
CONFIG_NAME = "mosquitto.conf"
PASSWORD_FILE_NAME = "passwords"
LOG_NAME = "mosquitto.log"
DATA_DIR_NAME = "data"
STATE_FILE_NAME = "broker.json"
ADDRESS_IN_USE = "Address already in use"
_TAIL_LINES = 30
"""Log lines quoted in error messages."""
_CHILDREN: Children = {}
"""Brokers started by this process, kept so they can be reaped (no zombies, no ResourceWarning)."""


class MqttBrokerError(RuntimeError):
    """Raised when the mosquitto binary is missing or a broker fails to start."""


class _StartupExit(MqttBrokerError):
    """The broker process exited during start-up (carries whether the port was taken)."""

    def __init__(self, message: str, port_in_use: bool) -> None:
        super().__init__(message)
        self.port_in_use = port_in_use


# --------------------------------------------------------------------------- paths


def run_dir() -> Path:
    """Directory for the ``up``/``down`` state file and broker data (``$RNNSTREAM_MQTT_RUN_DIR``)."""
    return cache_dir("RNNSTREAM_MQTT_RUN_DIR", "mqtt-run")


def state_file() -> Path:
    """Path of the JSON file describing the broker started by :func:`up`."""
    return run_dir() / STATE_FILE_NAME


def _executable(name: str, fallback: Path) -> str | None:
    """``name`` on ``PATH``, else ``fallback`` when it is executable, else None."""
    path = shutil.which(name)
    if path is None and os.access(fallback, os.X_OK):
        path = str(fallback)
    return path


def mosquitto_binary() -> str:
    """Path of the ``mosquitto`` executable: ``PATH`` first, then ``/usr/sbin/mosquitto``."""
    path = _executable("mosquitto", MOSQUITTO_FALLBACK)
    if path is not None:
        return path
    raise MqttBrokerError(
        "'mosquitto' not found on PATH nor at /usr/sbin/mosquitto; install it with "
        "scripts/system_deps.sh (apt-get install -y mosquitto mosquitto-clients)"
    )


# --------------------------------------------------------------------------- processes


def _runs_mosquitto(argv: list[bytes]) -> bool:
    """True if the command line ``argv`` runs a ``mosquitto`` executable."""
    return bool(argv) and argv[0].endswith(b"mosquitto")


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; True if it is gone."""
    return not wait_gone([pid], timeout, _CHILDREN, poll=0.02)


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of ``path``, or None when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS may hand it out again before it is bound)."""
    return free_ports(1, HOST)[0]


# --------------------------------------------------------------------------- broker


@dataclass
class Broker:
    """One local mosquitto; files live in ``base_dir`` (config, log, ``data/mosquitto.db``)."""

    port: int
    base_dir: Path
    pid: int = 0
    host: str = HOST
    tls_port: int = 0  # the TLS + password listener (0: none, a broker recorded before it existed)

    @property
    def tls_address(self) -> str:
        """``HOST:TLS_PORT``: the listener with TLS and username/password authentication."""
        return f"{self.host}:{self.tls_port}"

    @property
    def tls(self) -> TlsFiles:
        """This broker's CA certificate (``tls.ca_file``), server certificate and client password."""
        return TlsFiles(self.base_dir / "tls")

    @property
    def username(self) -> str:
        """The one user of the TLS listener."""
        return USERNAME

    @property
    def password_file(self) -> Path:
        """The file holding the TLS listener's password (``${file:...}`` in a config)."""
        return self.tls.password_file

    @property
    def address(self) -> str:
        """``HOST:PORT`` for clients."""
        return f"{self.host}:{self.port}"

    @property
    def config(self) -> Path:
        """The generated ``mosquitto.conf``."""
        return self.base_dir / CONFIG_NAME

    @property
    def log_file(self) -> Path:
        """Broker log (mosquitto's own log plus the process's stdout/stderr)."""
        return self.base_dir / LOG_NAME

    @property
    def data_dir(self) -> Path:
        """Persistence directory holding ``mosquitto.db``."""
        return self.base_dir / DATA_DIR_NAME

    @property
    def database(self) -> Path:
        """The persistence database (written by each autosave and on a clean shutdown)."""
        return self.data_dir / "mosquitto.db"

    def alive(self) -> bool:
        """True while this broker's process is running."""
        return self.pid > 0 and is_our_process(self.pid, self.config, _runs_mosquitto, _CHILDREN)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the broker (hard failure: only the last autosave survives) and wait for it."""
        if self.alive():
            send_signal(self.pid, signal.SIGKILL)
            _wait_gone(self.pid, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its database), wait up to ``timeout`` seconds, then SIGKILL."""
        if not self.alive():
            return
        send_signal(self.pid, signal.SIGTERM)
        if not _wait_gone(self.pid, timeout):
            self.kill()

    def restart(self, timeout: float = 15.0) -> None:
        """Start the broker again on the same port and persistence dir and wait until it is ready.

        Works right after :meth:`kill`: a start that fails with "address in use" (the old socket
        still closing) is retried until ``timeout`` seconds have passed.  A running broker is
        stopped first.
        """
        self.stop()
        _start(self, timeout, retry_same_port=True)

    def wait_for_autosave(self, timeout: float = 10.0) -> None:
        """Block until an autosave that *started after this call* has been written to disk.

        Use it before :meth:`kill` when the test needs everything up to now to survive.
        Mosquitto 2.0 saves when ``last_save + autosave_interval < now`` in whole seconds, so with
        ``autosave_interval 1`` the saves are ~2 s apart; a fixed sleep of "more than 1 s" is not
        enough.  Each save logs "Saving in-memory database" and then replaces ``mosquitto.db``.
        """
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        deadline = time.monotonic() + timeout
        before = _file_identity(self.database)
        while "Saving in-memory database" not in _log_since(self, offset):
            before = _file_identity(self.database)  # the file as it was before the new save started
            _check_deadline(self, deadline, timeout, "no autosave logged")
            time.sleep(0.02)
        while _file_identity(self.database) == before:
            _check_deadline(self, deadline, timeout, "autosave logged but mosquitto.db not replaced")
            time.sleep(0.02)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable description (used by the ``up``/``down`` state file)."""
        return {
            "host": self.host,
            "port": self.port,
            "address": self.address,
            "tls_port": self.tls_port,
            "base_dir": str(self.base_dir),
            "pid": self.pid,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Broker:
        """Inverse of :meth:`to_json`."""
        return cls(
            port=data["port"],
            base_dir=Path(data["base_dir"]),
            pid=data["pid"],
            host=data["host"],
            tls_port=data.get("tls_port", 0),
        )

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def broker_config(broker: Broker) -> str:
    """The ``mosquitto.conf`` text (see the module docstring for why each line is there)."""
    data_dir, log_file, tls = broker.data_dir, broker.log_file, broker.tls
    lines = ["# written by rnnstream.mqtt_broker; rewritten by every start_broker() call"]
    if os.geteuid() == 0:  # otherwise mosquitto drops to the "mosquitto" user (no effect for non-root)
        lines.append(f"user {pwd.getpwuid(0).pw_name}")
    lines += [
        "per_listener_settings true",
        f"listener {broker.port} {HOST}",
        "allow_anonymous true",
        "persistence true",
        f"persistence_location {data_dir}/",
        f"autosave_interval {AUTOSAVE_INTERVAL_S}",
        "autosave_on_changes false",
        "max_inflight_messages 0",
        "max_queued_messages 0",
        "max_queued_bytes 0",
        f"log_dest file {log_file}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"listener {broker.tls_port} {HOST}",
        f"cafile {tls.ca_file}",
        f"certfile {tls.cert_file}",
        f"keyfile {tls.key_file}",
        "allow_anonymous false",
        f"password_file {broker.base_dir / PASSWORD_FILE_NAME}",
    ]
    return "\n".join(lines) + "\n"


def _passwd_binary() -> str:
    path = _executable("mosquitto_passwd", PASSWD_FALLBACK)
    if path is not None:
        return path
    raise MqttBrokerError("'mosquitto_passwd' not found (it comes with the mosquitto package)")


def _write_tls_files(broker: Broker) -> None:
    """A fresh CA, server certificate and password for the TLS listener, and mosquitto's password file."""
    try:
        tls = make_tls_files(broker.tls.directory)
    except TlsSetupError as exc:
        raise MqttBrokerError(str(exc)) from exc
    passwords = broker.base_dir / PASSWORD_FILE_NAME
    passwords.unlink(missing_ok=True)
    passwords.touch(mode=0o600)
    cmd = [_passwd_binary(), "-b", str(passwords), USERNAME, tls.password()]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        raise MqttBrokerError(f"mosquitto_passwd failed: {proc.stderr.strip()[-2000:]}")


def _launch(broker: Broker) -> int:
    """Start the mosquitto process; return the log size before it (readiness reads only after it)."""
    offset = broker.log_file.stat().st_size if broker.log_file.exists() else 0
    cmd = [mosquitto_binary(), "-c", str(broker.config)]
    # own session: outlives the caller (``rnnstream mqtt up``) and its Ctrl-C
    broker.pid = spawn(cmd, broker.log_file, broker.base_dir, _CHILDREN)
    return offset


def _log_since(broker: Broker, offset: int) -> str:
    try:
        with open(broker.log_file, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _logged_running(log: str) -> bool:
    """True if ``log`` has mosquitto's "mosquitto version X running" (logged once listeners are open)."""
    return any(
        "mosquitto version" in line and line.rstrip().endswith(" running") for line in log.splitlines()
    )


def _check_deadline(broker: Broker, deadline: float, timeout: float, what: str) -> None:
    if not broker.alive():
        raise MqttBrokerError(
            f"mosquitto on port {broker.port} is not running; log:\n{tail(broker.log_file, _TAIL_LINES)}"
        )
    if time.monotonic() > deadline:
        raise MqttBrokerError(
            f"{what} within {timeout:.0f}s; log {broker.log_file}:\n{tail(broker.log_file, _TAIL_LINES)}"
        )


def _wait_ready(broker: Broker, offset: int, timeout: float) -> None:
    """Wait until this run logged "running" and the port accepts TCP connections."""
    deadline = time.monotonic() + timeout
    while True:
        if not broker.alive():
            log = _log_since(broker, offset)
            raise _StartupExit(
                f"mosquitto on port {broker.port} exited during startup; log {broker.log_file}:\n"
                f"{tail(broker.log_file, _TAIL_LINES)}",
                port_in_use=ADDRESS_IN_USE in log,
            )
        ports = (broker.port, broker.tls_port)
        if _logged_running(_log_since(broker, offset)) and all(port_open(p, 0.5, HOST) for p in ports):
            return
        if time.monotonic() > deadline:
            broker.kill()
            raise MqttBrokerError(
                f"mosquitto on port {broker.port} not ready after {timeout:.0f}s; "
                f"log {broker.log_file}:\n{tail(broker.log_file, _TAIL_LINES)}"
            )
        time.sleep(0.02)


def _start(broker: Broker, timeout: float, retry_same_port: bool) -> None:
    """Launch and wait; on "address in use" retry the same port or move to a fresh free one."""
    deadline = time.monotonic() + timeout
    while True:
        offset = _launch(broker)
        try:
            _wait_ready(broker, offset, max(deadline - time.monotonic(), 1.0))
            return
        except _StartupExit as exc:
            if not exc.port_in_use or time.monotonic() > deadline:
                raise MqttBrokerError(str(exc)) from None
        if retry_same_port:
            time.sleep(0.2)
        else:
            broker.port, broker.tls_port = free_ports(2, HOST)
            broker.config.write_text(broker_config(broker))


def start_broker(base_dir: Path, port: int | None = None, timeout: float = 15.0) -> Broker:
    """Start a fresh mosquitto on 127.0.0.1:``port`` (default: a free port) and wait until ready.

    ``base_dir`` receives ``mosquitto.conf``, ``mosquitto.log`` and ``data/`` (the persistence
    database), and ``tls/`` (a fresh CA, server certificate and password for the TLS listener on
    ``tls_port``, a free port).  An existing database there is removed, so the broker starts empty (use
    :meth:`Broker.restart` to keep it); an existing log is kept as ``mosquitto.log.1``.  The broker
    runs in its own session, so it outlives the calling process until :meth:`Broker.stop`.  Raises
    :class:`MqttBrokerError` (with the log tail) when it does not accept connections within
    ``timeout`` seconds.
    """
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    plain, tls_port = free_ports(2, HOST)
    broker = Broker(port=port if port is not None else plain, base_dir=base, tls_port=tls_port)
    shutil.rmtree(broker.data_dir, ignore_errors=True)
    broker.data_dir.mkdir()
    if broker.log_file.exists():
        broker.log_file.replace(broker.log_file.with_name(LOG_NAME + ".1"))
    _write_tls_files(broker)
    broker.config.write_text(broker_config(broker))
    try:
        _start(broker, timeout, retry_same_port=port is not None)
    except BaseException:
        broker.kill()
        raise
    return broker


# --------------------------------------------------------------------------- up / down / status


def _read_state() -> Broker | None:
    return read_state(state_file(), Broker.from_json)


def status() -> Broker | None:
    """The broker recorded by :func:`up` if it is still running, else ``None``."""
    broker = _read_state()
    return broker if broker is not None and broker.alive() else None


def up(port: int | None = None, timeout: float = 15.0) -> Broker:
    """Start a broker under :func:`run_dir` and record it, or return the live recorded one.

    Asking for a ``port`` other than the live recorded broker's raises :class:`MqttBrokerError`.
    """
    with state_lock(run_dir()):
        current = _read_state()
        if current is not None and current.alive():
            if port is not None and port != current.port:
                raise MqttBrokerError(
                    f"a broker is already running at {current.address}; run 'rnnstream mqtt down' first"
                )
            return current
        broker = start_broker(run_dir() / "broker", port=port, timeout=timeout)
        write_state(state_file(), broker.to_json())
        return broker


def down(timeout: float = 10.0) -> bool:
    """Stop the broker recorded by :func:`up` and forget it; True if it was running."""
    with state_lock(run_dir()):
        current = _read_state()
        if current is None:
            return False
        was_running = current.alive()
        current.stop(timeout=timeout)
        state_file().unlink(missing_ok=True)
        return was_running
