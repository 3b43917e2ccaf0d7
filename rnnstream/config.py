"""Service configuration: YAML files validated by pydantic. A bad key or value is reported with its path
(``kafka.group_id: field required``), and unknown keys are refused rather than silently ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.finetune import FineTuneSettings


class ConfigError(ValueError):
    """The configuration file is missing, not YAML, or fails validation; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(Strict):
    """``engine.Engine`` settings."""

    device: str = "auto"
    max_batch: int = Field(4096, ge=1)
    max_delay_ms: float = Field(0.0, ge=0)
    capacity: int = Field(1024, ge=1)
    ttl_s: float | None = Field(None, gt=0)
    eviction: Literal["drop", "spill"] = "drop"
    spill_dir: Path | None = None


class CheckpointConfig(Strict):
    """How often state and input positions are made durable together (one Kafka transaction)."""

    interval_ms: int = Field(200, ge=10)
    transaction_timeout_ms: int = Field(10_000, ge=1000)
    changelog_topic: str | None = None  # default: "<group_id>-state-changelog"


class KafkaConfig(Strict):
    """Kafka connection and topics. ``client`` is passed through to every kafka-python client (security
    settings: ``security_protocol``, ``sasl_mechanism``, ``sasl_plain_username``, ``ssl_cafile``, ...);
    ``consumer`` and ``producer`` only to the consumer (``session_timeout_ms``, ...) or the producer
    (``linger_ms``, ``compression_type``, ...)."""

    bootstrap_servers: str
    input_topics: list[str] = Field(min_length=1)
    output_topic: str
    dead_letter_topic: str
    feedback_topic: str | None = None
    group_id: str
    # kafka-python by default (pure Python); confluent-kafka (librdkafka) is several times faster on
    # small messages (README, "Kafka client libraries").
    client_library: Literal["kafka-python", "confluent-kafka"] = "kafka-python"
    instance_id: str = "0"  # one per process of the group; a restart must reuse its predecessor's
    encoding: Literal["json", "msgpack", "float32"] = "json"
    output_encoding: Literal["json", "msgpack"] = "json"
    max_message_bytes: int = Field(1_048_576, ge=64)
    max_timesteps_per_message: int = Field(4096, ge=1)
    max_poll_records: int = Field(5000, ge=1)
    client: dict[str, Any] = Field(default_factory=dict)
    consumer: dict[str, Any] = Field(default_factory=dict)
    producer: dict[str, Any] = Field(default_factory=dict)

    @field_validator("client", "consumer", "producer")
    @classmethod
    def _no_reserved_client_keys(cls, client: dict[str, Any]) -> dict[str, Any]:
        reserved = {"bootstrap_servers", "group_id", "transactional_id", "enable_auto_commit"}
        reserved |= {"isolation_level", "key_deserializer", "value_deserializer"}
        clash = reserved & set(client)
        if clash:
            raise ValueError(f"set by rnnstream itself, not under 'client': {sorted(clash)}")
        return client


class ServiceConfig(Strict):
    """The whole ``rnnstream run`` configuration."""

    model: Path
    kafka: KafkaConfig
    engine: EngineConfig = EngineConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    finetune: FineTuneSettings | None = None  # online fine-tuning (off when absent)
    metrics_port: int | None = Field(None, ge=0, le=65535)  # admin endpoint: /metrics, /stats, /finetune/*

    @property
    def changelog_topic(self) -> str:
        return self.checkpoint.changelog_topic or f"{self.kafka.group_id}-state-changelog"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{where}: {e['msg']}")
    return "; ".join(lines)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ServiceConfig:
    """Read and validate a YAML config. Relative paths in it (``model``) are relative to the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        config = ServiceConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_format_errors(exc)}") from exc
    if not config.model.is_absolute():
        config = config.model_copy(update={"model": (path.parent / config.model).resolve()})
    ft = config.finetune
    if ft is not None and ft.versions_dir is not None and not Path(ft.versions_dir).is_absolute():
        ft = ft.model_copy(update={"versions_dir": str((path.parent / ft.versions_dir).resolve())})
        config = config.model_copy(update={"finetune": ft})
    return config


def _set_dotted(doc: dict[str, Any], dotted: str, value: Any) -> None:
    """``_set_dotted(d, "kafka.group_id", "g")`` sets ``d["kafka"]["group_id"] = "g"``."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        doc = doc.setdefault(key, {})
    doc[leaf] = value
