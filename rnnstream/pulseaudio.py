"""Headless PulseAudio with a null sink: a microphone for machines without a sound card.

Standard library only (never import :mod:`sounddevice` here).  Needs the Debian packages
``pulseaudio pulseaudio-utils libportaudio2 libasound2-plugins`` (``scripts/system_deps.sh``).
Used by ``rnnstream audio up/down``, the test suite and CI.

The recipe: a user daemon (``--system=false``; as root it only warns) with its own runtime dir
(``XDG_RUNTIME_DIR``, mode 700), ``-n`` plus a startup script that loads
``module-native-protocol-unix auth-anonymous=1`` and ``module-null-sink sink_name=rnnstream``,
and makes the sink's ``.monitor`` the default source.  ``paplay`` into the sink is then captured
from the monitor as from a microphone; sounddevice opens it as the ALSA device ``"pulse"``.

Pitfalls:

* Clients need the daemon's environment (:attr:`AudioServer.env`) *before* PortAudio scans its
  devices, which happens when :mod:`sounddevice` is first imported: call :func:`use_server` first.
* A null sink with no low-latency client renders 2 s at a time, so a stream's first callback
  comes ~1.8 s late and audio is lost.  A ``parec --latency-msec=20`` reader stays attached, and
  on each start the sink is suspended and resumed once the reader is attached, which ends the
  2 s block the sink began with (instead of waiting ~2.5 s for it to run out).
* A server that dies (:meth:`AudioServer.kill`) ends a callback stream at once: no more callbacks,
  no status flag, ``stream.active`` turns False, ``finished_callback`` runs, ``stop()``/``close()``
  return at once; a blocking ``read()`` raises ``PortAudioError``.  After :meth:`AudioServer.restart`
  a new stream opens without re-initialising PortAudio (needed only if sounddevice was imported
  while no server ran: ``"pulse"`` is then missing from its device list).
* ``pulseaudio -k`` and the clients write ``~/.config/pulse`` (a cookie); harmless.

:func:`up` / :func:`down` / :func:`status` keep one long-lived server, found again through a JSON
state file (default ``~/.cache/rnnstream/audio-run/server.json``; override the directory with
``RNNSTREAM_AUDIO_RUN_DIR``; it must be short: the socket path is limited to 107 bytes).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnstream.local_services import (
    Children,
    cache_dir,
    is_our_process,
    read_state,
    send_signal,
    spawn,
    state_lock,
    tail,
    wait_gone,
    write_state,
)

RUN_DIR_ENV = "RNNSTREAM_AUDIO_RUN_DIR"
SINK = "rnnstream"
DEVICE = "pulse"
"""The ALSA device (from libasound2-plugins) that sounddevice/PortAudio opens to reach the server."""
READER_LATENCY_MS = 20
"""Latency (ms) the attached ``parec`` reader requests; it sets how often the null sink renders."""
STATE_FILE_NAME = "server.json"
SCRIPT_NAME = "rnnstream.pa"
LOG_NAME = "pulseaudio.log"
READER_LOG_NAME = "reader.log"
RUNTIME_DIR_NAME = "runtime"
MAX_SOCKET_PATH = 107
"""Longest unix socket path Linux accepts (``sun_path`` is 108 bytes with the NUL)."""
PACKAGES = "pulseaudio pulseaudio-utils libportaudio2 libasound2-plugins"
_TAIL_LINES = 30
_CHILDREN: Children = {}
"""Daemons and readers started by this process, kept so they can be reaped."""


class AudioServerError(RuntimeError):
    """Raised when the PulseAudio binaries are missing or the server fails to start."""


def run_dir() -> Path:
    """Directory of the state file, the startup script, the logs and the runtime dir."""
    return cache_dir(RUN_DIR_ENV, "audio-run")


def state_file() -> Path:
    """Path of the JSON file describing the server started by :func:`up`."""
    return run_dir() / STATE_FILE_NAME


def binary(name: str) -> str:
    """Path of ``name`` (``pulseaudio``, ``pactl``, ``parec``, ``paplay``) on ``PATH``."""
    path = shutil.which(name)
    if path is None:
        raise AudioServerError(
            f"'{name}' not found on PATH; install the Debian packages {PACKAGES} "
            "(scripts/system_deps.sh does it)"
        )
    return path


def _runs(program: bytes) -> Callable[[list[bytes]], bool]:
    """A test for :func:`is_our_process`: does the command line run ``program``?"""
    return lambda argv: bool(argv) and argv[0].endswith(program)


@dataclass
class AudioServer:
    """One PulseAudio daemon with a null sink; its files live in ``runtime_dir.parent``."""

    rate: int
    runtime_dir: Path
    sink: str = SINK
    pid: int = 0
    reader_pid: int = 0

    # ------------------------------------------------------------------ names and environment
    @property
    def source(self) -> str:
        """The sink's monitor: the source that captures what is played into the sink."""
        return f"{self.sink}.monitor"

    @property
    def device(self) -> str:
        """The name to open with sounddevice (``sd.InputStream(device=server.device)``)."""
        return DEVICE

    @property
    def base_dir(self) -> Path:
        return self.runtime_dir.parent

    @property
    def socket(self) -> Path:
        """The native protocol's unix socket."""
        return self.runtime_dir / "pulse" / "native"

    @property
    def script(self) -> Path:
        return self.base_dir / SCRIPT_NAME

    @property
    def log_file(self) -> Path:
        return self.base_dir / LOG_NAME

    @property
    def env(self) -> dict[str, str]:
        """Environment variables a client (pactl, paplay, PortAudio's ALSA ``pulse`` device) needs."""
        return {"XDG_RUNTIME_DIR": str(self.runtime_dir), "PULSE_SERVER": f"unix:{self.socket}"}

    def _full_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    # ------------------------------------------------------------------ processes
    @property
    def alive(self) -> bool:
        """True while this server's daemon is running."""
        return self.pid > 0 and is_our_process(self.pid, self.script, _runs(b"pulseaudio"), _CHILDREN)

    def _reader_alive(self) -> bool:
        return self.reader_pid > 0 and is_our_process(
            self.reader_pid, self.socket, _runs(b"parec"), _CHILDREN
        )

    def pactl(self, *args: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
        """Run ``pactl ARGS`` against this server (output captured as text, not checked)."""
        return subprocess.run(
            [binary("pactl"), *args],
            env=self._full_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def play(self, path: str | os.PathLike[str], wait: bool = True) -> subprocess.Popen[bytes] | None:
        """Play the sound file ``path`` into the sink with ``paplay``.

        ``wait=True`` blocks until it has been played (raises :class:`AudioServerError` if paplay
        fails) and returns None; ``wait=False`` returns the running ``paplay`` process.
        """
        proc = subprocess.Popen(
            [binary("paplay"), f"--device={self.sink}", str(path)],
            env=self._full_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if not wait:
            return proc
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise AudioServerError(f"paplay {path} failed ({proc.returncode}): {err.decode().strip()}")
        return None

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the daemon (a device that disappears) and wait for it; :meth:`restart` brings it back.

        The ``parec`` reader loses its connection and exits; it is killed too if it lingers.
        """
        for pid, alive in ((self.pid, self.alive), (self.reader_pid, self._reader_alive())):
            if alive:
                send_signal(pid, signal.SIGKILL)
                wait_gone([pid], timeout, _CHILDREN, poll=0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the reader, then the daemon (``pulseaudio -k``, SIGKILL after ``timeout`` seconds)."""
        if self._reader_alive():
            send_signal(self.reader_pid, signal.SIGTERM)
            if wait_gone([self.reader_pid], timeout, _CHILDREN, poll=0.02):
                send_signal(self.reader_pid, signal.SIGKILL)
        if not self.alive:
            return
        subprocess.run(
            [binary("pulseaudio"), "-k"], env=self._full_env(), capture_output=True, timeout=timeout
        )
        if wait_gone([self.pid], timeout, _CHILDREN, poll=0.02):
            self.kill()

    def restart(self, timeout: float = 15.0) -> None:
        """Start again with the same rate, sink and runtime dir (after :meth:`kill`; a running one is
        stopped first); the state file, if this server has one, gets the new pids."""
        self.stop()
        self._start(timeout)
        state = self.base_dir / STATE_FILE_NAME
        if state.exists():
            write_state(state, self.to_json())

    def _start(self, timeout: float) -> None:
        """Launch the daemon, wait until the sink is there, attach the reader (``timeout`` s in all)."""
        daemon = binary("pulseaudio")
        binary("pactl")
        binary("parec")
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.runtime_dir.chmod(0o700)
        # a pid file naming a process that is gone but not reaped (a zombie) makes pulseaudio
        # believe it is still running; nothing of ours runs here now
        (self.runtime_dir / "pulse" / "pid").unlink(missing_ok=True)
        self.script.write_text(startup_script(self.sink, self.rate))
        env = ["env", *(f"{k}={v}" for k, v in self.env.items())]  # spawn() takes no env; env execs
        cmd = [daemon, "--system=false", "--exit-idle-time=-1", "-n", "--daemonize=no", "--log-time=yes"]
        self.pid = spawn([*env, *cmd, "-F", str(self.script)], self.log_file, self.base_dir, _CHILDREN)
        try:
            deadline = time.monotonic() + timeout
            self._wait(
                lambda: self.pactl("info").returncode == 0, deadline, "pulseaudio did not answer 'pactl info'"
            )
            sinks = self.pactl("list", "short", "sinks").stdout
            if self.sink not in sinks.split():
                raise AudioServerError(f"no sink {self.sink!r} (pactl list short sinks: {sinks!r})")
            self._start_reader(deadline)
            # ends the 2 s block the null sink started with; it renders every ~20 ms from now on
            for suspend in ("1", "0"):
                self.pactl("suspend-sink", self.sink, suspend)
        except BaseException:
            self.kill()
            raise

    def _start_reader(self, deadline: float) -> None:
        """Attach ``parec --latency-msec=20`` to the monitor (the socket path in its argv identifies it)."""
        reader = [binary("parec"), "-s", str(self.socket), f"--latency-msec={READER_LATENCY_MS}"]
        reader += [f"--rate={self.rate}", f"--device={self.source}", "/dev/null"]
        log = self.base_dir / READER_LOG_NAME
        self.reader_pid = spawn(reader, log, self.base_dir, _CHILDREN)

        def attached() -> bool:
            if not self._reader_alive():
                raise AudioServerError(f"the parec reader exited; log {log}:\n{tail(log, _TAIL_LINES)}")
            return bool(self.pactl("list", "short", "source-outputs").stdout.strip())

        self._wait(attached, deadline, "the parec reader did not attach")

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        """Poll ``ready()`` every 20 ms until it is true; raise when the daemon dies or at ``deadline``."""
        while not ready():
            if not self.alive:
                raise AudioServerError(f"pulseaudio exited during start-up; {self._log()}")
            if time.monotonic() > deadline:
                raise AudioServerError(f"{what} in time; {self._log()}")
            time.sleep(0.02)

    def _log(self) -> str:
        return f"log {self.log_file}:\n{tail(self.log_file, _TAIL_LINES)}"

    # ------------------------------------------------------------------ state file
    def to_json(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "sink": self.sink,
            "source": self.source,
            "runtime_dir": str(self.runtime_dir),
            "pid": self.pid,
            "reader_pid": self.reader_pid,
            "env": self.env,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AudioServer:
        return cls(
            rate=int(data["rate"]),
            runtime_dir=Path(data["runtime_dir"]),
            sink=data["sink"],
            pid=int(data["pid"]),
            reader_pid=int(data["reader_pid"]),
        )


def startup_script(sink: str, rate: int) -> str:
    """The daemon's startup script (``pulseaudio -n -F FILE``)."""
    return (
        "# written by rnnstream.pulseaudio\n"
        "load-module module-native-protocol-unix auth-anonymous=1\n"
        f"load-module module-null-sink sink_name={sink} rate={rate} "
        f"sink_properties=device.description={sink}\n"
        f"set-default-sink {sink}\n"
        f"set-default-source {sink}.monitor\n"
    )


# --------------------------------------------------------------------------- up / down / status


def _read_state() -> AudioServer | None:
    return read_state(state_file(), AudioServer.from_json)


def status() -> AudioServer | None:
    """The server recorded by :func:`up` if its daemon is running, else None."""
    server = _read_state()
    return server if server is not None and server.alive else None


def up(rate: int = 48000, timeout: float = 15.0) -> AudioServer:
    """Start the server (null sink at ``rate`` Hz) and record it, or return the running one.

    Waits until it is ready (at most ``timeout`` seconds).  The daemon runs in its own session
    and outlives the caller until :func:`down`.  Asking for another ``rate`` than the running
    server's raises :class:`AudioServerError`.
    """
    with state_lock(run_dir()):
        current = _read_state()
        if current is not None and current.alive:
            if current.rate != rate:
                raise AudioServerError(
                    f"an audio server is already running at {current.rate} Hz; "
                    "run 'rnnstream audio down' first"
                )
            return current
        if current is not None:
            current.stop()  # a reader left behind by a killed daemon
        server = AudioServer(rate=rate, runtime_dir=run_dir() / RUNTIME_DIR_NAME)
        if len(str(server.socket).encode()) > MAX_SOCKET_PATH:
            raise AudioServerError(f"socket path {server.socket} too long; set {RUN_DIR_ENV} shorter")
        server._start(timeout)
        write_state(state_file(), server.to_json())
        return server


def down(timeout: float = 10.0) -> bool:
    """Stop the server recorded by :func:`up` and forget it; True if it was running."""
    with state_lock(run_dir()):
        current = _read_state()
        if current is None:
            return False
        was_running = current.alive
        current.stop(timeout=timeout)
        state_file().unlink(missing_ok=True)
        return was_running


def client_env() -> dict[str, str]:
    """The running server's :attr:`AudioServer.env`, or ``{}`` when none is running."""
    server = status()
    return server.env if server is not None else {}


def use_server(server: AudioServer) -> None:
    """Put ``server.env`` into ``os.environ``: call before the first ``import sounddevice``
    (PortAudio scans the devices then)."""
    os.environ.update(server.env)
