"""Process and state-file helpers shared by the local service launchers.

Standard library only.  Used by :mod:`rnnstream.kafka_broker` and :mod:`rnnstream.mqtt_broker`,
which start long-lived background processes (in their own session), find them again through a
JSON state file and must not mistake a reused pid for their own process.

Each launcher keeps its own ``children`` registry (pid -> :class:`subprocess.Popen`) of the
processes it started, so they can be reaped (no zombies, no ``ResourceWarning``); the helpers that
look at pids take it as an argument.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

LOCALHOST = "127.0.0.1"

Children = dict[int, subprocess.Popen[bytes]]
"""Processes started by this process, by pid."""

T = TypeVar("T")


# --------------------------------------------------------------------------- paths


def cache_dir(env_var: str, name: str) -> Path:
    """``$env_var`` (``~`` expanded) when set and non-empty, else ``~/.cache/rnnstream/<name>``."""
    env = os.environ.get(env_var)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rnnstream" / name


# --------------------------------------------------------------------------- processes


def pid_alive(pid: int, children: Children | None = None) -> bool:
    """True if ``pid`` exists and is not a zombie (reaping it if it is an exited child in ``children``)."""
    if children is not None and (child := children.get(pid)) is not None:
        if child.poll() is None:
            return True
        del children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def is_our_process(
    pid: int, config: Path, program: Callable[[list[bytes]], bool], children: Children | None = None
) -> bool:
    """Guard against pid reuse: ``pid`` must be alive, run ``config`` and satisfy ``program(argv)``.

    ``argv`` is the process's ``/proc/<pid>/cmdline`` split on NUL bytes.  Our own children are
    trusted (their cmdline is still Python's between fork and exec), and so is any live pid when
    there is no ``/proc`` (non-Linux).
    """
    if not pid_alive(pid, children):
        return False
    if children is not None and pid in children:
        return True
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (non-Linux): trust the pid
    return program(argv) and str(config).encode() in argv


def send_signal(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``; a process that is already gone is not an error."""
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(
    pids: Sequence[int], timeout: float, children: Children | None = None, poll: float = 0.1
) -> list[int]:
    """Wait until all ``pids`` are gone, checking every ``poll`` s; return those alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p, children)]
    while alive and time.monotonic() < deadline:
        time.sleep(poll)
        alive = [p for p in alive if pid_alive(p, children)]
    return alive


def spawn(cmd: list[str], log_file: Path, cwd: Path, children: Children) -> int:
    """Start ``cmd`` in its own session with stdout+stderr appended to ``log_file``; return its pid.

    The new session lets it outlive the caller (a CLI ``up`` command) and the caller's Ctrl-C.
    The process is recorded in ``children``.
    """
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
    children[proc.pid] = proc
    return proc.pid


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the text file ``path`` (``"<no log>"`` if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


# --------------------------------------------------------------------------- ports


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """Return ``count`` distinct currently-free TCP ports on ``host``.

    The OS may hand a port out again before the caller binds it.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int, timeout: float, host: str = LOCALHOST) -> bool:
    """True if a TCP connection to ``host:port`` succeeds within ``timeout`` seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


# --------------------------------------------------------------------------- state file


@contextmanager
def state_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` (created with ``run_dir`` if missing)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_state(path: Path, parse: Callable[[Any], T]) -> T | None:
    """``parse`` of the JSON in ``path``, or None if it is missing, not JSON or not what ``parse`` wants.

    ``parse`` signals a malformed document with ``KeyError``, ``TypeError`` or ``ValueError``.
    """
    try:
        return parse(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (through a ``.tmp`` sibling)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
