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


# ---- partial batches and capacity (engine reliability, issue 11) ------------------------------------------
class PartiallyAppliedError(EngineError, RuntimeError):
    """A batch failed part-way (a device error in its second wave, say). The events ``applied`` (indices
    into the call's events, ascending ``(K,) int64``) had their steps applied: their streams' states
    advanced and they were counted and recorded, with ``outputs`` ``(K, output_size) float32`` aligned with
    ``applied``. No other event of the call changed any state. The original error is the ``__cause__``."""

    def __init__(self, message: str, applied: object, outputs: object) -> None:
        super().__init__(message)
        self.applied = applied
        self.outputs = outputs


class StreamCapacityError(EngineError, RuntimeError):
    """New streams could not get a slot: ``max_streams`` or ``max_state_bytes`` was reached and no other
    stream could be evicted. ``stream_ids``: the refused streams; ``indices``: the refused events (indices
    into the call's events). Nothing changed: the call's other events can be submitted again without these."""

    def __init__(self, message: str, stream_ids: list, indices: list[int]) -> None:
        super().__init__(message)
        self.stream_ids = stream_ids
        self.indices = indices


class RefusedEndError(EngineError, ValueError):
    """A stream's end was refused by its model (``StreamModel.end_refusals``): an utterance past its length
    bound, say. The message gives the model's reason; the stream's slot was freed all the same, and no
    other stream of the batch was touched (counted in ``EngineStats.refused_ends``)."""
