"""How a long-running rnnstream process logs and ends.

- ``configure_logging``: one handler on the root logger (text, or JSON lines) with ``RepeatLimit``, so
  that an error repeated in a loop (a client library's I/O thread failing on every pass, say) is logged
  a few times, then once per ``window_s`` with how many were suppressed, never once per loop pass.
- ``exit_within(seconds, status)``: after a fatal error or a stop signal the process must end promptly
  with a non-zero status so that a supervisor restarts it, even when a library thread that is not a
  daemon refuses to stop (Python waits for those at exit). A daemon timer ends the process with
  ``os._exit(status)`` if the orderly shutdown has not finished by then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RepeatLimit(logging.Filter):
    """Lets through the first ``burst`` records of one kind (logger, level, message template, exception
    type) per ``window_s`` seconds; the next one after the window says how many were suppressed."""

    def __init__(self, burst: int = 5, window_s: float = 60.0) -> None:
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._seen: dict[tuple, list[float | int]] = {}  # kind → [window start, count, suppressed]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        kind = (record.name, record.levelno, str(record.msg), exc)
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is None or now - seen[0] >= self.window_s:
                suppressed = int(seen[2]) if seen is not None else 0
                self._seen[kind] = [now, 1, 0]
                if len(self._seen) > 10_000:  # bounded: forget the oldest kinds
                    for old in list(self._seen)[:5_000]:
                        del self._seen[old]
                if suppressed:
                    record.msg = f"{record.msg} [{suppressed} more like this in the last {self.window_s:g} s]"
                return True
            seen[1] += 1
            if seen[1] <= self.burst:
                return True
            seen[2] += 1
            return False


class JsonLines(logging.Formatter):
    """One JSON object per record: ``{"ts", "level", "logger", "message"}``, plus ``"exception"`` (the
    formatted traceback) when there is one; for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


@contextlib.contextmanager
def logging_to_stderr(
    level: str = "INFO", json_lines: bool = False, burst: int = 5, window_s: float = 60.0
) -> Iterator[None]:
    """``configure_logging`` for the duration of a command; its handler is removed afterwards (a command
    run in-process, by a test, leaves no logging behind)."""
    handler = configure_logging(level, json_lines, burst, window_s)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)


def configure_logging(
    level: str = "INFO", json_lines: bool = False, burst: int = 5, window_s: float = 60.0
) -> logging.Handler:
    """Root logging to stderr at ``level`` (text, or ``JsonLines``), with repeats limited. Calling it
    again replaces the handler it installed before (and no other)."""
    handler = _Stderr()
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(FORMAT))
    handler.addFilter(RepeatLimit(burst, window_s))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (an in-process test
    runner swaps it per command; a handler bound to an old one would write to a closed stream)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def exit_within(seconds: float, status: int) -> threading.Timer:
    """End the process with ``status`` in ``seconds`` unless it has ended by itself before."""

    def force() -> None:
        logging.getLogger("rnnstream").error(
            "still running %g s after shutdown began (a thread that does not stop): exiting with %d",
            seconds,
            status,
        )
        logging.shutdown()
        os._exit(status)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()
    return timer
