"""Service configuration: YAML files validated by pydantic. A bad key or value is reported with its path
(``kafka.group_id: field required``), and unknown keys are refused rather than silently ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.finetune import FineTuneSettings
from models.rollout import MAX_HORIZON
from rnnstream.config_secrets import normalized_key, resolve, resolve_settings


class ConfigError(ValueError):
    """The configuration file is missing, not YAML, or fails validation; the message names the key."""


class Strict(BaseModel):
    # hide_input_in_errors: a ValidationError (kept as a ConfigError's cause) never quotes a value, a secret
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class EngineConfig(Strict):
    """``engine.Engine`` settings."""

    device: str = "auto"
    max_batch: int = Field(4096, ge=1)
    max_delay_ms: float = Field(0.0, ge=0)
    capacity: int = Field(1024, ge=1)
    ttl_s: float | None = Field(None, gt=0)
    eviction: Literal["drop", "spill"] = "drop"
    spill_dir: Path | None = None
    max_streams: int | None = Field(None, ge=1)  # streams held in memory; past it: evict LRU or refuse
    max_state_bytes: int | None = Field(None, ge=1)  # bytes of state tensors; same policy


class CheckpointConfig(Strict):
    """How often state, outputs and source positions are made durable together: one Kafka transaction
    for a Kafka source; one local file (``dir``) for the others (none: nothing survives a restart)."""

    interval_ms: int = Field(200, ge=10)
    transaction_timeout_ms: int = Field(10_000, ge=1000)
    changelog_topic: str | None = None  # Kafka source; default: "<group_id>-state-changelog"
    dir: Path | None = None  # other sources: where state.safetensors is kept


RESERVED_KAFKA_KEYS = frozenset(
    {
        "bootstrap_servers",
        "group_id",
        "group_instance_id",
        "transactional_id",
        "enable_auto_commit",
        "enable_idempotence",
        "isolation_level",
        "key_deserializer",
        "value_deserializer",
        "key_serializer",
        "value_serializer",
        "auto_offset_reset",
        "transaction_timeout_ms",
    }
)
"""Client settings rnnstream chooses itself (exactly-once depends on them), in kafka-python's spelling; a
confluent-kafka key is compared with its dots and dashes as underscores."""


class KafkaConnection(Strict):
    """How to reach Kafka, for every Kafka source, sink and dead-letter topic of the pipeline. ``client``
    is passed to every client of the chosen library (security settings: ``security_protocol``,
    ``sasl_mechanism``, ``ssl_cafile``, ...); ``consumer`` and ``producer`` only to that one
    (``session_timeout_ms``, ``linger_ms``, ``compression_type``, ...). Settings are passed through as
    written, in the library's own names.

    Secrets (any key naming a ``password`` or ``secret``, inline keys such as ``ssl.key.pem``) are
    references, never the secret itself: ``${env:NAME}`` or ``${file:/absolute/path}``
    (``rnnstream.config_secrets``); a literal is refused naming the key. Resolved, they are ``SecretStr``
    (shown as ``**********``) until the client is built. Kafka over SASL_SSL with kafka-python::

        kafka:
          bootstrap_servers: broker1:9093
          client:
            security_protocol: SASL_SSL
            ssl_cafile: /etc/rnnstream/ca.pem
            sasl_mechanism: PLAIN          # or SCRAM-SHA-256 / SCRAM-SHA-512
            sasl_plain_username: rnnstream
            sasl_plain_password: ${env:KAFKA_PASSWORD}

    and with ``client_library: confluent-kafka``: ``security.protocol``, ``ssl.ca.location``,
    ``sasl.mechanism``, ``sasl.username``, ``sasl.password``."""

    bootstrap_servers: str
    # kafka-python by default (pure Python); confluent-kafka (librdkafka) is several times faster on
    # small messages (README, "Kafka client libraries").
    client_library: Literal["kafka-python", "confluent-kafka"] = "kafka-python"
    instance_id: str = "0"  # one per process of a consumer group; a restart must reuse its predecessor's
    client: dict[str, Any] = Field(default_factory=dict)
    consumer: dict[str, Any] = Field(default_factory=dict)
    producer: dict[str, Any] = Field(default_factory=dict)

    @field_validator("client", "consumer", "producer")
    @classmethod
    def _no_reserved_client_keys(cls, client: dict[str, Any]) -> dict[str, Any]:
        """Keys rnnstream sets itself, in either library's spelling (``isolation_level`` for
        kafka-python, ``isolation.level`` for confluent-kafka), are refused; secrets' references are
        resolved (``rnnstream.config_secrets.resolve_settings``)."""
        clash = [k for k in client if normalized_key(k) in RESERVED_KAFKA_KEYS]
        if clash:
            raise ValueError(f"set by rnnstream itself, not in the config: {sorted(clash)}")
        return resolve_settings(client)


class MqttTls(Strict):
    """TLS to the MQTT broker (paho's ``tls_set``); files are PEM, relative paths relative to the config
    file. ``key_password`` is a secret reference, as ``MqttConnection.password``."""

    ca_file: Path | None = None  # CA certificates the broker's certificate must chain to (None: the system's)
    cert_file: Path | None = None  # client certificate, when the broker asks for one (mutual TLS)
    key_file: Path | None = None  # its private key
    key_password: SecretStr | None = None  # ${env:NAME} or ${file:/path}: the private key's password
    check_hostname: bool = True  # the certificate must name the broker's host

    @field_validator("key_password", mode="before")
    @classmethod
    def _resolve_secret(cls, value: object, info: ValidationInfo) -> SecretStr | None:
        return _secret_field(value, info)


class MqttConnection(Strict):
    """How to reach the MQTT broker, for every MQTT source, sink and dead-letter topic. Each gets the
    stable client id ``<client_id>``, ``<client_id>-out`` or ``<client_id>-dlq`` and a persistent session.

    ``password`` is a reference, never the password itself: ``${env:NAME}`` or ``${file:/absolute/path}``
    (``rnnstream.config_secrets``; a literal is refused). MQTT over TLS with a username and password::

        mqtt:
          broker: broker.example.com:8883
          username: rnnstream
          password: ${file:/run/secrets/mqtt_password}
          tls:
            ca_file: /etc/rnnstream/ca.pem"""

    broker: str = "127.0.0.1:1883"  # host:port
    client_id: str = "rnnstream"
    username: str | None = None
    password: SecretStr | None = None  # ${env:NAME} or ${file:/path}
    tls: MqttTls | None = None  # None: plaintext
    keepalive_s: int = Field(30, ge=5)
    session_expiry_s: int = Field(86_400, ge=0)

    @field_validator("password", mode="before")
    @classmethod
    def _resolve_secret(cls, value: object, info: ValidationInfo) -> SecretStr | None:
        return _secret_field(value, info)


def _secret_field(value: object, info: ValidationInfo) -> SecretStr | None:
    """A secret field's reference resolved (``rnnstream.config_secrets.resolve``); ``None`` stays."""
    return None if value is None else resolve(str(info.field_name), value)


class KafkaSourceConfig(Strict):
    """Kafka input topics read by a consumer group; exactly-once. Record key = stream id."""

    type: Literal["kafka"]
    topics: list[str] = Field(min_length=1)
    group_id: str
    feedback_topic: str | None = None
    format: Literal["json", "msgpack", "float32"] = "json"
    max_message_bytes: int = Field(1_048_576, ge=64)
    max_timesteps_per_message: int = Field(4096, ge=1)
    max_poll_records: int = Field(5000, ge=1)


class ReadingFormat(Strict):
    """Sensor readings (``connectors.readings``): which channels a reading carries, in the model's order."""

    channels: list[str] = Field(default_factory=lambda: ["value"], min_length=1)
    extra_channels: Literal["reject", "ignore"] = "reject"
    max_abs_value: float = Field(1e15, gt=0)
    max_bytes: int = Field(65_536, ge=64)


class MqttSourceConfig(ReadingFormat):
    """Readings from an MQTT topic pattern; the wildcard levels name the stream (``sensors/+``:
    ``sensors/dev1`` → ``dev1``). QoS 1: at-least-once, redeliveries dropped by (stream, timestamp)."""

    type: Literal["mqtt"]
    topic: str = "sensors/+"
    qos: Literal[0, 1] = 1


class SerialSourceConfig(ReadingFormat):
    """Readings from a serial line: ``timestamp,value[,value...]`` or JSON lines; best-effort."""

    type: Literal["serial"]
    port: str
    baudrate: int = Field(115_200, ge=50)
    stream_id: str | None = None  # default: the port's name


class CsvSourceConfig(ReadingFormat):
    """Readings replayed from CSV files (NAB's ``timestamp,value``, or any header with a column mapping:
    ``timestamp_column``, ``channels``, ``stream_column``); replayable from a row."""

    type: Literal["csv"]
    paths: list[str] = Field(min_length=1)  # files or glob patterns; each file is a stream...
    stream_column: str | None = None  # ... unless a column names the stream
    timestamp_column: str = "timestamp"
    speed: float | None = Field(None, gt=0)  # None: as fast as possible; 1: real pace; 60: an hour a minute


class MicrophoneSourceConfig(Strict):
    """Live audio from capture devices (sounddevice/PortAudio), one stream per device; best-effort.
    ``null`` picks the headless sound server of ``rnnstream audio up`` when it runs, else the default
    input."""

    type: Literal["microphone"]
    devices: list[str | int | None] = Field(default_factory=lambda: [None], min_length=1)  # names or indices
    names: list[str] | None = None  # stream ids, one per device (default: mic, mic:<device>)
    rate: int | None = Field(None, gt=0)  # capture rate, Hz (default: the device's own)
    block_ms: float = Field(10.0, gt=0, le=1000)  # the capture callback's block
    buffer_s: float = Field(10.0, gt=0)  # the ring buffer between the callback and the pipeline
    reopen_s: float = Field(1.0, gt=0)  # a lost device is reopened this often


class AudioFilesSourceConfig(Strict):
    """Audio files (WAV, FLAC...) replayed through the microphone's path, one stream per file."""

    type: Literal["audio_files"]
    paths: list[str] = Field(min_length=1)  # files or glob patterns
    speed: float | None = Field(None, gt=0)  # None: as fast as possible; 1: real pace


AUDIO_SOURCES = (MicrophoneSourceConfig, AudioFilesSourceConfig)


class VideoSourceConfig(Strict):
    """Video files or directories of images (``connectors.video``), one stream (camera) per path, each
    frame one feature vector; replayable from a frame. The feature settings left out are the model
    bundle's (``features["video"]``), else ``connectors.video.FrameFeatures``' defaults."""

    type: Literal["video"]
    paths: list[str] = Field(min_length=1)  # video files, directories of images, or glob patterns
    names: list[str] | None = None  # stream ids, one per path (default: each path's stem)
    speed: float | None = Field(None, gt=0)  # None: as fast as possible; 1: the videos' own pace
    fps: float = Field(25.0, gt=0)  # frames a second of an image directory
    features: list[Literal["grey", "difference", "histogram"]] | None = Field(None, min_length=1)
    rows: int | None = Field(None, ge=1, le=1024)  # grid of the grey and difference features
    cols: int | None = Field(None, ge=1, le=1024)
    bins: int | None = Field(None, ge=1, le=256)  # histogram bins per colour channel


SourceConfig = Annotated[
    KafkaSourceConfig
    | MqttSourceConfig
    | SerialSourceConfig
    | CsvSourceConfig
    | MicrophoneSourceConfig
    | AudioFilesSourceConfig
    | VideoSourceConfig,
    Field(discriminator="type"),
]


class KafkaSinkConfig(Strict):
    type: Literal["kafka"]
    topic: str
    format: Literal["json", "msgpack"] = "json"


class MqttSinkConfig(Strict):
    type: Literal["mqtt"]
    topic: str = "scores/{stream}"  # {stream}: the stream id
    qos: Literal[0, 1] = 1
    retain: bool = False


class StdoutSinkConfig(Strict):
    type: Literal["stdout"]


class CsvSinkConfig(Strict):
    type: Literal["csv"]
    path: Path
    columns: list[str] | None = None  # default: stream + the first output's keys


class JsonLinesSinkConfig(Strict):
    type: Literal["jsonl"]
    path: Path


class NullSinkConfig(Strict):
    type: Literal["null"]


SinkConfig = Annotated[
    KafkaSinkConfig
    | MqttSinkConfig
    | StdoutSinkConfig
    | CsvSinkConfig
    | JsonLinesSinkConfig
    | NullSinkConfig,
    Field(discriminator="type"),
]


class KafkaDeadLettersConfig(Strict):
    type: Literal["kafka"]
    topic: str


class MqttDeadLettersConfig(Strict):
    type: Literal["mqtt"]
    topic: str = "deadletters/{stream}"


class FileDeadLettersConfig(Strict):
    type: Literal["file"]
    path: Path  # JSON lines; "-" for standard error


DeadLettersConfig = Annotated[
    KafkaDeadLettersConfig | MqttDeadLettersConfig | FileDeadLettersConfig, Field(discriminator="type")
]


class ReadingsConfig(Strict):
    """Checks of timestamped readings (``rnnstream.sensors.ReadingGuard``)."""

    max_gap_s: float | None = Field(None, gt=0)
    on_gap: Literal["keep", "reset"] = "keep"
    flatline_after: int | None = Field(100, ge=2)


class ScoringConfig(Strict):
    """What the sink receives: ``raw`` model outputs with the input position; ``forecast``: a next-value
    forecaster's error as a tail probability (``rnnstream.sensors.ForecastScoring``); ``detector``: the
    anomaly detector (``rnnstream.anomaly.AnomalyDetector``: surprise, anomaly likelihood, refractory
    period); ``recognition``: one document per utterance of an audio source, with its label
    (``rnnstream.speech.RecognitionScoring``; the only kind for audio sources). Fields a kind does not
    use are ignored."""

    kind: Literal["raw", "forecast", "detector", "recognition"] = "raw"
    window: int = Field(1000, ge=2)  # readings of the running normalisation
    warmup: int = Field(20, ge=0)  # forecast: readings before the first score
    short_window: int | None = Field(None, ge=1)  # forecast: 1, detector: 10
    long_window: int | None = Field(None, ge=2)  # forecast: 2000, detector: 1000
    threshold: float | None = Field(None, gt=0, le=1)  # forecast: 0.999, detector: 0.25
    refractory: int | None = Field(None, ge=0)  # forecast: 50, detector: 200
    learn: int = Field(300, ge=1)  # detector: readings before the first score
    err_window: int = Field(1000, ge=1)  # detector: readings of the running error scale
    temperature: float = Field(4.0, gt=0)  # detector: surprise = 1 - exp(-error / (temperature · scale))
    spatial_tolerance: float | None = Field(0.05, ge=0)  # detector: beyond the range seen (None: off)
    season_s: float | None = Field(604_800.0, gt=0)  # detector: compare with one period ago (None: off)
    season_bucket_s: float = Field(300.0, gt=0)  # detector: time resolution of that comparison
    calibration: Literal["likelihood", "none"] = "likelihood"  # detector
    record_discount: float | None = Field(0.8, gt=0, le=1)  # detector: × for a score below the stream's best
    forecaster: Literal["model", "last"] = "model"  # detector: "last" is the naive last-value baseline


class ForecastConfig(Strict):
    """Forecast rollouts in the output documents (``rnnstream.forecast``): each document also carries
    ``"forecasts"``, the model's next ``horizon`` outputs fed back as inputs, in the document's units."""

    horizon: int = Field(ge=1, le=MAX_HORIZON)


class LimitsConfig(Strict):
    """Limits on what one stream may send (``rnnstream.limits``). The other limits sit with what they
    bound: ``engine.max_streams``, ``engine.max_state_bytes``, the source's ``max_message_bytes`` /
    ``max_bytes``."""

    stream_events_per_s: float | None = Field(None, gt=0)  # per stream, sustained (None: no limit)
    stream_burst: float | None = Field(None, ge=1)  # per stream, at once (default: one second's worth)


class TextConfig(Strict):
    """Text messages (``connectors.text``): each message's text becomes token-id events through the
    model's tokenizer (``ModelInfo.features["tokenizer"]``); a control ``end`` labels the user's stream."""

    text_key: str = "text"  # JSON key / CSV column of the text
    control_key: str = "control"  # ... of the control (start, end, reset; an empty CSV cell: none)
    stream_key: str = "user"  # ... naming the stream when the message has no key (CSV: source.stream_column)
    max_bytes: int = Field(65_536, ge=64)  # a larger message is refused unread
    outputs: Literal["ends", "messages"] = "ends"  # ends: a label per end marker; messages: also per message


class ServiceConfig(Strict):
    """The whole ``rnnstream run`` configuration: source → decode → engine → sink."""

    model: Path
    source: SourceConfig
    sink: SinkConfig
    dead_letters: DeadLettersConfig | None = None  # default: a file beside the checkpoint, else stderr
    kafka: KafkaConnection | None = None  # needed when a part is Kafka
    mqtt: MqttConnection = MqttConnection()  # for MQTT parts
    readings: ReadingsConfig | None = None  # checks of timestamped readings (default on for sensors)
    scoring: ScoringConfig = ScoringConfig()
    forecast: ForecastConfig | None = None  # "forecasts" (next outputs) in each output document (off: absent)
    engine: EngineConfig = EngineConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    finetune: FineTuneSettings | None = None  # online fine-tuning (off when absent)
    limits: LimitsConfig = LimitsConfig()
    text: TextConfig | None = None  # text messages through the model's tokenizer (off when absent)
    metrics_port: int | None = Field(None, ge=0, le=65535)  # admin endpoint: /metrics, /stats, /finetune/*

    @model_validator(mode="after")
    def _connections_present(self) -> ServiceConfig:
        parts = [self.source, self.sink, self.dead_letters]
        kinds = {getattr(p, "type", None) for p in parts}
        if "kafka" in kinds and self.kafka is None:
            raise ValueError("kafka: a Kafka source, sink or dead-letter topic needs a 'kafka' section")
        ckpt = self.checkpoint
        if isinstance(self.source, KafkaSourceConfig) and ckpt.interval_ms >= ckpt.transaction_timeout_ms:
            raise ValueError(
                f"checkpoint.interval_ms ({ckpt.interval_ms}) must be below "
                f"checkpoint.transaction_timeout_ms ({ckpt.transaction_timeout_ms}): the broker aborts a "
                "transaction open that long"
            )
        if isinstance(self.source, AUDIO_SOURCES) != (self.scoring.kind == "recognition"):
            raise ValueError("scoring.kind: recognition goes with an audio source (microphone, audio_files)")
        return self

    @property
    def changelog_topic(self) -> str:
        group = self.source.group_id if isinstance(self.source, KafkaSourceConfig) else "rnnstream"
        return self.checkpoint.changelog_topic or f"{group}-state-changelog"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{where}: {e['msg']}")
    return "; ".join(lines)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ServiceConfig:
    """Read and validate a YAML config. Relative paths in it (the model, files, directories) are relative
    to the config file."""
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
    _resolve_paths(raw, path.parent.resolve())
    try:
        return ServiceConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_format_errors(exc)}") from exc


PATH_KEYS = ("model", "checkpoint.dir", "finetune.versions_dir", "sink.path", "dead_letters.path")
PATH_KEYS += ("mqtt.tls.ca_file", "mqtt.tls.cert_file", "mqtt.tls.key_file")


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the config's relative paths relative to ``base`` (in place, before validation)."""

    def resolved(value: Any) -> Any:
        if isinstance(value, str) and value != "-" and not Path(value).is_absolute():
            return str((base / value).resolve())
        return value

    for dotted in PATH_KEYS:
        *parents, leaf = dotted.split(".")
        doc: Any = raw
        for key in parents:
            doc = doc.get(key) if isinstance(doc, dict) else None
        if isinstance(doc, dict) and leaf in doc:
            doc[leaf] = resolved(doc[leaf])
    source = raw.get("source")
    if isinstance(source, dict) and isinstance(source.get("paths"), list):
        source["paths"] = [resolved(p) for p in source["paths"]]


def _set_dotted(doc: dict[str, Any], dotted: str, value: Any) -> None:
    """``_set_dotted(d, "kafka.group_id", "g")`` sets ``d["kafka"]["group_id"] = "g"``."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        doc = doc.setdefault(key, {})
    doc[leaf] = value
