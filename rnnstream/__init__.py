"""rnnstream's application layer: the command line, the demo job, dev services (local Kafka)."""

__version__ = "0.1.0"
