"""The rnnstream engine: per-stream recurrent state, batching, the step loop, snapshots."""

from engine.batcher import plan_waves
from engine.engine import Engine, EvictionPolicy, resolve_device
from engine.errors import (
    EngineClosedError,
    EngineError,
    InvalidInputError,
    InvalidStreamIdError,
    PartiallyAppliedError,
    RefusedEndError,
    SnapshotError,
    StreamCapacityError,
    UnknownStreamError,
)
from engine.snapshot import EngineSnapshot
from engine.state import StateStore, StreamId
from engine.stats import EngineStats

__all__ = [
    "Engine",
    "EngineClosedError",
    "EngineError",
    "EngineSnapshot",
    "EngineStats",
    "EvictionPolicy",
    "InvalidInputError",
    "InvalidStreamIdError",
    "PartiallyAppliedError",
    "RefusedEndError",
    "SnapshotError",
    "StateStore",
    "StreamCapacityError",
    "StreamId",
    "UnknownStreamError",
    "plan_waves",
    "resolve_device",
]
