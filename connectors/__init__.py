"""Connectors: where events come from (``Source``) and where outputs go (``Sink``)."""

from connectors.base import CONTROLS, Control, DeadLetter, Event, Sink, Source
from connectors.simulated import SensorSequences, SimulatedSensors, simulate_sequences

__all__ = [
    "CONTROLS",
    "Control",
    "DeadLetter",
    "Event",
    "SensorSequences",
    "SimulatedSensors",
    "Sink",
    "Source",
    "simulate_sequences",
]
