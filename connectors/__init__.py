"""Connectors: where messages come from (``Source``), where outputs go (``Sink``), where rejected input goes
(``DeadLetters``) and where states are kept (``StateBackend``); one module per thing a connector talks to
(``kafka``, ``mqtt``, ``serial``, ``csv``, ``files``), imported when used."""

from connectors.base import (
    CONTROLS,
    CheckpointFailed,
    Control,
    DeadLetter,
    DeadLetters,
    Event,
    Guarantee,
    Message,
    Output,
    Sink,
    Source,
    StateBackend,
)
from connectors.simulated import SensorSequences, SimulatedSensors, simulate_sequences

__all__ = [
    "CONTROLS",
    "CheckpointFailed",
    "Control",
    "DeadLetter",
    "DeadLetters",
    "Event",
    "Guarantee",
    "Message",
    "Output",
    "SensorSequences",
    "SimulatedSensors",
    "Sink",
    "Source",
    "StateBackend",
    "simulate_sequences",
]
