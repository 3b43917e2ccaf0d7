"""Sensors on a serial line (pyserial): one reading per line, framed here, decoded elsewhere.

Protocol: one reading per line, ``timestamp,value[,value...]`` or a JSON object, terminated by ``\\n`` or
``\\r\\n``. ``SerialSource`` only frames lines: each line becomes a ``Message`` whose payload is the line's
bytes without the terminator; the pipeline's decoder turns it into an event or a dead letter.

A reader thread owns the port: it reads bytes, frames lines and queues them (bounded); ``poll`` hands the
queued lines to the pipeline. Nothing wrong is hidden: every problem is counted (``counters()``) and the
line concerned still reaches the pipeline, whose decoder dead-letters it; ``line_problem(position)``
names what was wrong with a recent line, and ``FlaggedLineDecoder`` turns such a line into a dead letter
with that reason (a partial ``1700000001,2.`` would otherwise parse as a reading).

- partial line: bytes, then no terminator for ``line_timeout_s`` seconds of silence, or the port closing
  mid-line → emitted as it stands, ``partial_lines``;
- oversized line: more than ``max_line_bytes`` bytes before the terminator → its first
  ``max_line_bytes`` bytes emitted at once, the rest of that line discarded, ``oversized_lines``;
- garbage: a line holding bytes that are not UTF-8, NUL, or another control character than tab, CR and
  LF → emitted unchanged, ``garbage_lines`` (a wrong baud rate looks like this);
- empty lines (a bare terminator) carry no reading: skipped, ``empty_lines``, no position;
- the pipeline falling behind: the oldest queued lines are dropped, ``dropped_lines`` (logged);
- the port disappearing (USB unplugged, pty closed): logged once at ERROR, ``disconnects``; ``poll``
  returns ``[]`` while the port is reopened with exponential backoff (``reopens`` when it is back, each
  failed try in ``open_errors``). Repeated errors are logged at most once per longest backoff.
"""

from __future__ import annotations

import codecs
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import serial

from connectors.base import Assignment, Guarantee, Message
from connectors.codec import Decoded, DecodeError, refusing

log = logging.getLogger("connectors.serial")

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""Control characters other than tab, LF and CR (C0, DEL and C1), in decoded text."""


@dataclass(frozen=True, slots=True)
class Line:
    """One framed line: ``payload`` without its terminator; ``partial``: why it has no terminator
    (``None`` when it has one); ``oversized``: cut to ``max_line_bytes``."""

    payload: bytes
    partial: str | None = None
    oversized: bool = False


class LineFramer:
    """Splits a byte stream into lines ended by ``\\n`` (a ``\\r`` before it is dropped). A line longer
    than ``max_line_bytes`` bytes is returned cut to that length as soon as it is known to be too long;
    the rest of it, up to its terminator, is discarded. No I/O, no clock: the caller says when a line has
    waited too long (``flush``)."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._discarding = False  # inside the tail of an oversized line

    @property
    def active(self) -> bool:
        """A line has begun and has not ended."""
        return bool(self._buf) or self._discarding

    def feed(self, data: bytes) -> list[Line]:
        """The lines that ``data`` completes (or reveals as oversized), in order."""
        lines: list[Line] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            self._take(data[start:] if end < 0 else data[start:end], lines)
            if end < 0:
                return lines
            self._end_line(lines)
            start = end + 1

    def flush(self, reason: str) -> Line | None:
        """End the current line without a terminator: its bytes as a partial line (``None`` when none are
        held, e.g. in the discarded tail of an oversized line)."""
        line = Line(bytes(self._buf), partial=reason) if self._buf else None
        self._buf.clear()
        self._discarding = False
        return line

    def _take(self, chunk: bytes, lines: list[Line]) -> None:
        if self._discarding or not chunk:
            return
        self._buf += chunk
        if len(self._buf) > self.max_line_bytes + 1:  # + 1: room for the CR of a CRLF
            lines.append(Line(bytes(self._buf[: self.max_line_bytes]), oversized=True))
            self._buf.clear()
            self._discarding = True

    def _end_line(self, lines: list[Line]) -> None:
        if self._discarding:
            self._discarding = False
            return
        payload = bytes(self._buf[:-1] if self._buf.endswith(b"\r") else self._buf)
        self._buf.clear()
        if len(payload) > self.max_line_bytes:
            lines.append(Line(payload[: self.max_line_bytes], oversized=True))
        else:
            lines.append(Line(payload))


def garbage(payload: bytes, complete: bool = True) -> str | None:
    """Why ``payload`` is not clean text (``None`` when it is): invalid UTF-8, or a control character
    other than tab, CR and LF. A line cut short (``complete=False``) may end inside a UTF-8 sequence:
    that alone is not garbage."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(payload, final=complete)
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (byte 0x{payload[exc.start]:02x} at {exc.start})"
    bad = _CONTROL.search(text)
    if bad is not None:
        return f"control character U+{ord(bad.group()):04X} at {bad.start()}"
    return None


@dataclass
class SerialCounters:
    lines: int = 0  # lines handed to the queue (positions given)
    bytes: int = 0  # bytes read from the port
    partial_lines: int = 0
    oversized_lines: int = 0
    garbage_lines: int = 0
    empty_lines: int = 0
    dropped_lines: int = 0  # oldest queued lines dropped because the pipeline fell behind
    disconnects: int = 0
    reopens: int = 0
    open_errors: int = 0  # failed tries to open the port


class SerialSource:
    """Lines from serial port ``port`` (a device path, a pty, or a pyserial URL such as ``loop://``),
    best-effort: what the device sent while the process was down, or the port away, is gone.

    - ``stream_id``: the messages' key (default: the port's name); ``topic`` is the port.
    - ``baudrate``: bits per second.
    - ``max_line_bytes``: longest line kept (bytes, terminator excluded).
    - ``line_timeout_s``: silence (seconds) after which bytes without a terminator are a partial line.
    - ``reopen_backoff_s``: ``(first, longest)`` wait (seconds) between tries to reopen a lost port,
      doubling from the first to the longest.
    - ``max_queued_lines``: lines held for ``poll``; beyond, the oldest are dropped (counted).
    """

    guarantee: Guarantee = "best-effort"

    def __init__(
        self,
        port: str,
        stream_id: str | None = None,
        baudrate: int = 115200,
        max_line_bytes: int = 4096,
        line_timeout_s: float = 1.0,
        reopen_backoff_s: tuple[float, float] = (0.1, 5.0),
        max_queued_lines: int = 10_000,
    ) -> None:
        if max_line_bytes < 1 or max_queued_lines < 1 or line_timeout_s <= 0:
            raise ValueError("max_line_bytes, max_queued_lines and line_timeout_s must be positive")
        if not 0 < reopen_backoff_s[0] <= reopen_backoff_s[1]:
            raise ValueError(
                f"reopen_backoff_s must be (first, longest), 0 < first <= longest: {reopen_backoff_s}"
            )
        self.port = port
        self.key = stream_id or port
        self.baudrate = baudrate
        self.line_timeout_s = line_timeout_s
        self.backoff_s = reopen_backoff_s
        self.max_queued_lines = max_queued_lines
        self._read_timeout_s = min(0.05, line_timeout_s / 2)  # bounds close() and the partial-line check
        self._framer = LineFramer(max_line_bytes)
        self._counts = SerialCounters()
        self._ready = threading.Condition()  # guards _queue, _problems, _counts, _position
        self._queue: deque[Message] = deque()
        self._problems: OrderedDict[int, str] = OrderedDict()
        self._position = 0
        self._serial: serial.SerialBase | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._delay_s = reopen_backoff_s[0]
        self._last_byte = 0.0  # time.monotonic() of the last byte read
        self._down_since: float | None = None  # time.monotonic() when the port was lost
        self._logged: dict[str, tuple[float, int]] = {}  # key → (last logged, suppressed since)

    # ---- Source --------------------------------------------------------------------------------------
    def open(self, assignment: Assignment, resume: Mapping[str, Any]) -> None:
        """Announce partition 0, open the port and start reading. ``resume`` is unused (best-effort). A
        port that is absent now is retried in the background like a lost one; an invalid port URL or
        setting raises ``ValueError``."""
        assignment.assigned([0])
        if not self._try_open():
            self._down_since = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"serial {self.port}", daemon=True)
        self._thread.start()

    def poll(self, timeout_s: float) -> list[Message]:
        """The lines received since the last poll, oldest first; ``[]`` after ``timeout_s`` seconds
        without any."""
        with self._ready:
            if not self._queue:
                self._ready.wait_for(lambda: self._queue, timeout_s)
            out = list(self._queue)
            self._queue.clear()
        return out

    @property
    def exhausted(self) -> bool:
        return False

    def positions(self) -> dict[str, Any]:
        return {}

    def commit(self) -> None:
        pass

    def rollback(self) -> list[int]:
        return [0]

    def close(self) -> None:
        """Stop the reader and close the port, within one read timeout (``min(0.05, line_timeout_s / 2)``
        seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            if self._thread.is_alive():
                log.warning("serial port %s: the reader thread did not stop within 2 s", self.port)
        else:
            self._close_port()

    # ---- introspection -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """The port is open (``False`` while it is away and being reopened)."""
        return self._serial is not None

    def counters(self) -> dict[str, int]:
        """A snapshot of the counters (see ``SerialCounters``)."""
        with self._ready:
            return asdict(self._counts)

    def line_problem(self, position: int) -> str | None:
        """What was wrong with the line at ``position`` (partial, oversized, garbage; ``None`` when
        nothing was, or when it is older than the last ``2 * max_queued_lines`` flagged lines)."""
        with self._ready:
            return self._problems.get(position)

    # ---- reader thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._serial is None:
                    self._reopen()
                else:
                    self._read_once(self._serial)
        except Exception:
            log.exception("serial port %s: the reader stopped", self.port)
        finally:
            self._close_port()

    def _try_open(self) -> bool:
        try:
            self._serial = serial.serial_for_url(
                self.port, baudrate=self.baudrate, timeout=self._read_timeout_s
            )
        except (serial.SerialException, OSError) as exc:  # absent or unusable now; ValueError propagates
            with self._ready:
                self._counts.open_errors += 1
            self._log(logging.ERROR, "open", "serial port %s cannot be opened (%s); retrying", self.port, exc)
            return False
        if self._down_since is not None:
            with self._ready:
                self._counts.reopens += 1
            away = time.monotonic() - self._down_since
            log.warning("serial port %s is back after %.1f s; reading lines again", self.port, away)
            self._down_since = None
        return True

    def _reopen(self) -> None:
        """Wait the current backoff, then try to open the port once."""
        if self._stop.wait(self._delay_s):
            return
        self._delay_s = min(2 * self._delay_s, self.backoff_s[1])
        self._try_open()

    def _read_once(self, port: serial.SerialBase) -> None:
        try:
            data = port.read(max(1, port.in_waiting))
        except (serial.SerialException, OSError) as exc:
            self._lost(exc)
            return
        now = time.monotonic()
        if data:
            self._delay_s = self.backoff_s[0]  # the port works: a later loss starts with a short wait
            self._last_byte = now
            with self._ready:
                self._counts.bytes += len(data)
            self._emit(self._framer.feed(data))
        elif self._framer.active and now - self._last_byte >= self.line_timeout_s:
            self._emit([self._framer.flush(f"no terminator after {self.line_timeout_s:g} s of silence")])

    def _lost(self, exc: Exception) -> None:
        """The port failed: emit the line it cut, close it, count and log the loss."""
        self._emit([self._framer.flush("the port closed mid-line")])
        self._close_port()
        self._down_since = time.monotonic()
        with self._ready:
            self._counts.disconnects += 1
        lo, hi = self.backoff_s
        self._log(
            logging.ERROR,
            "lost",
            "serial port %s disconnected (%s); reopening (backoff %g to %g s); lines sent meanwhile are lost",
            self.port,
            exc,
            lo,
            hi,
        )
        self._logged["open"] = (time.monotonic(), 0)  # failed reopens: next reported a longest backoff later

    def _close_port(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            try:
                port.close()
            except Exception as exc:  # a vanished device may fail to close; it is gone either way
                log.debug("serial port %s: close failed: %s", self.port, exc)

    def _emit(self, lines: list[Line | None]) -> None:
        """Queue ``lines`` as messages (dropping the oldest queued when full), counting their problems."""
        now = time.monotonic()
        dropped = 0
        with self._ready:
            for line in lines:
                if line is None:
                    continue
                if not line.payload and line.partial is None:
                    self._counts.empty_lines += 1
                    continue
                if len(self._queue) >= self.max_queued_lines:
                    self._queue.popleft()
                    dropped += 1
                self._queue.append(Message(line.payload, self.key, 0, self._position, self.port, now))
                self._note_problems(line)
                self._position += 1
            self._counts.dropped_lines += dropped
            self._ready.notify_all()
        if dropped:
            self._log(
                logging.WARNING,
                "drop",
                "serial port %s: the pipeline fell behind; dropped the oldest lines (%d in all)",
                self.port,
                self._counts.dropped_lines,
            )

    def _note_problems(self, line: Line) -> None:
        """Count what is wrong with ``line`` and remember it by position (caller holds the lock)."""
        problems = []
        if line.partial is not None:
            self._counts.partial_lines += 1
            problems.append(f"partial line ({line.partial})")
        if line.oversized:
            self._counts.oversized_lines += 1
            problems.append(f"oversized line (cut to {self._framer.max_line_bytes} bytes)")
        bad = garbage(line.payload, complete=line.partial is None and not line.oversized)
        if bad is not None:
            self._counts.garbage_lines += 1
            problems.append(f"garbage bytes ({bad})")
        self._counts.lines += 1
        if problems:
            self._problems[self._position] = "; ".join(problems)
            while len(self._problems) > 2 * self.max_queued_lines:
                self._problems.popitem(last=False)

    def _log(self, level: int, key: str, msg: str, *args: Any) -> None:
        """Log ``msg`` unless the same kind (``key``) was logged less than the longest backoff ago; the
        messages held back are logged at DEBUG and counted in the next one."""
        now = time.monotonic()
        last, held = self._logged.get(key, (float("-inf"), 0))
        if now - last < self.backoff_s[1]:
            self._logged[key] = (last, held + 1)
            log.debug(msg, *args)
            return
        if held:
            msg += f" ({held} more since the last report)"
        self._logged[key] = (now, 0)
        log.log(level, msg, *args)


class LineDecoder(Protocol):
    """The pipeline's decoder (``rnnstream.pipeline.MessageDecoder``)."""

    def decode(self, message: Message) -> Decoded: ...


class FlaggedLineDecoder:
    """Wraps ``decoder`` for the lines of ``source``: a line the source flagged (partial, oversized,
    garbage) raises ``DecodeError`` with the source's reason (``kind``: ``partial``, ``oversized`` or
    ``garbage``), even when its bytes would parse, since a cut line can look like a valid reading; every
    other message goes to ``decoder``."""

    def __init__(self, source: SerialSource, decoder: LineDecoder) -> None:
        self.source = source
        self.decoder = decoder

    @refusing
    def decode(self, message: Message) -> Decoded:
        problem = self.source.line_problem(message.position) if message.topic == self.source.port else None
        if problem is not None:
            raise DecodeError(problem, problem.split(" ", 1)[0])
        return self.decoder.decode(message)
