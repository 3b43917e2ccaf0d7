"""Errors the engine raises. Each names the event or stream at fault; none of them changes any state."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error raised by the engine."""


class InvalidInputError(EngineError, ValueError):
    """An event's input is unusable: wrong feature count, wrong dtype, NaN/Inf, id out of range."""


class InvalidStreamIdError(EngineError, TypeError):
    """A stream id is neither a ``str`` nor an ``int``."""


class UnknownStreamError(EngineError, KeyError):
    """A control event (``end``, ``reset``) names a stream the engine does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown stream"


class EngineClosedError(EngineError, RuntimeError):
    """The engine was closed; it accepts no more events."""


class SnapshotError(EngineError, ValueError):
    """A snapshot does not fit this engine's model (state widths, format)."""
