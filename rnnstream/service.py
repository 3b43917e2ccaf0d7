"""From a validated config (``rnnstream.config``) to a running ``Pipeline``: the one place that knows which
connector module serves which ``type``. Connectors are imported only when a config names them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from connectors.base import DeadLetters, Sink, Source, StateBackend
from connectors.codec import Decoder, KeyedDecoder
from engine import Engine
from engine.finetune import FineTuneSettings, serving_bundle
from models import StreamModel, UtteranceModel, load_bundle
from rnnstream.admin import AdminServer
from rnnstream.anomaly import AnomalyDetector
from rnnstream.checkpoint import EphemeralState, LocalCheckpoint
from rnnstream.config import (
    AUDIO_SOURCES,
    AudioFilesSourceConfig,
    CsvSourceConfig,
    KafkaSourceConfig,
    LimitsConfig,
    MicrophoneSourceConfig,
    MqttSourceConfig,
    MqttTls,
    ReadingsConfig,
    SerialSourceConfig,
    ServiceConfig,
    VideoSourceConfig,
)
from rnnstream.config_secrets import reveal, revealed
from rnnstream.limits import StreamRateLimit
from rnnstream.pipeline import MessageDecoder, Pipeline, RawOutputs, Scoring
from rnnstream.sensors import ForecastScoring, ReadingGuard

if TYPE_CHECKING:
    from rnnstream.forecast import Forecaster

log = logging.getLogger("rnnstream.service")


def build_pipeline(config: ServiceConfig) -> Pipeline:
    """Engine, source, decoder, sink, dead letters, state backend and stages, as ``config`` says."""
    engine = _engine(config)
    kafka = _kafka_client(config)
    source = _source(config, kafka)
    sink = _sink(config, kafka)
    dead_letters = _dead_letters(config, kafka)
    decoder = _decoder(config, engine.model)
    if isinstance(config.source, SerialSourceConfig):
        from connectors.serial import FlaggedLineDecoder

        decoder = FlaggedLineDecoder(source, decoder)  # partial, cut and garbled lines are dead letters
    scoring = _scoring(config, engine.model)
    pipeline = Pipeline(
        engine,
        source,
        decoder,
        sink,
        dead_letters,
        _backend(config, kafka),
        scoring=scoring,
        checks=_checks(config),
        checkpoint_interval_s=config.checkpoint.interval_ms / 1e3,
        labels_wanted=config.finetune is not None and config.finetune.target == "feedback",
        rate_limit=_rate_limit(config.limits),
        forecaster=_forecaster(config, engine, scoring),
    )
    if config.metrics_port is not None:
        admin = AdminServer(
            engine, config.metrics_port, extra=pipeline.service_counters, health=pipeline.health
        )
        log.info(
            "admin endpoint on http://%s (/metrics, /stats, /healthz, /readyz, /finetune/*)", admin.address
        )
        pipeline.add_on_close(admin.close)
    return pipeline


def check(config: ServiceConfig) -> str:
    """What ``build_pipeline`` checks without connecting to anything: the model loads, its inputs fit
    the source (channels, features), the scoring fits the model, the files named exist. Returns a
    one-line summary; raises ``ValueError`` (or ``OSError``) naming what is wrong."""
    model = load_bundle(config.model)
    _decoder(config, model)
    scoring = _scoring(config, model)
    if config.forecast is not None:
        from rnnstream.forecast import check_forecast_setup

        check_forecast_setup(model, scoring)
    src = config.source
    paths = getattr(src, "paths", None)
    files = len(_expand(paths)) if paths else 0
    what = f"{src.type} source" + (f" ({files} files)" if files else "")
    if isinstance(model, UtteranceModel):
        cells = model.describe()
    else:
        cells = "+".join(layer.kind for layer in model.layers)
    scoring, sink = config.scoring.kind, config.sink.type
    return f"{what} → model {cells} ({model.feature_size} inputs) → {scoring} scoring → {sink} sink"


def _finetune_settings(config: ServiceConfig) -> FineTuneSettings | None:
    """``config.finetune`` with this instance's own versions directory. With a Kafka source, each instance
    of the consumer group keeps its versions in ``versions_dir/<group_id>/<kafka.instance_id>`` (each id
    one escaped level): one config serves several instances on a host, and a restart, which reuses its
    instance id, resumes its own serving version. Other sources use ``versions_dir`` as it is. Either
    way, a second fine-tuner on a directory is refused (``engine.finetune`` locks it)."""
    ft = config.finetune
    if ft is None or ft.versions_dir is None or not isinstance(config.source, KafkaSourceConfig):
        return ft
    assert config.kafka is not None  # checked by the config
    own = Path(ft.versions_dir) / _path_part(config.source.group_id) / _path_part(config.kafka.instance_id)
    return ft.model_copy(update={"versions_dir": str(own)})


def _path_part(name: str) -> str:
    """``name`` as one directory level, reversibly: percent-escaped; ``.``/``..`` escaped; ``""``: ``%``."""
    part = quote(name, safe="")
    return part.replace(".", "%2E") if part in (".", "..") else part or "%"


def _engine(config: ServiceConfig) -> Engine:
    ft = _finetune_settings(config)
    resumed = serving_bundle(ft.versions_dir) if ft is not None and ft.versions_dir else None
    model = load_bundle(resumed or config.model)
    if resumed is not None:
        log.info("fine-tuning: resuming with %s (version %d)", resumed.name, model.info.version)
    e = config.engine
    engine = Engine(
        model,
        device=e.device,
        max_batch=e.max_batch,
        max_delay_ms=e.max_delay_ms,
        capacity=e.capacity,
        ttl_s=e.ttl_s,
        eviction=e.eviction,
        spill_dir=e.spill_dir,
        max_streams=e.max_streams,
        max_state_bytes=e.max_state_bytes,
    )
    if ft is not None:
        engine.start_finetuning(ft)
    return engine


def _kafka_settings(config: ServiceConfig, group_id: str) -> Any:
    from connectors import kafka as kc

    k = config.kafka
    assert k is not None  # checked by the config
    return kc.ClientSettings(
        k.bootstrap_servers,
        group_id,
        k.instance_id,
        revealed(k.client),  # secrets as text from here on: only the client library gets them
        revealed(k.consumer),
        revealed(k.producer),
        config.checkpoint.transaction_timeout_ms,
    )


def _kafka_client(config: ServiceConfig) -> Any:
    """The transactional client shared by a Kafka source and the pipeline's other Kafka parts."""
    src = config.source
    if not isinstance(src, KafkaSourceConfig):
        return None
    from connectors import kafka as kc

    assert config.kafka is not None
    _reach_kafka(config)
    client = kc.open_client(config.kafka.client_library, _kafka_settings(config, src.group_id))
    others = [p.topic for p in (config.sink, config.dead_letters) if getattr(p, "type", None) == "kafka"]
    inputs = src.topics + ([src.feedback_topic] if src.feedback_topic else [])
    client.ensure_topics(inputs, others, config.changelog_topic)
    return client


def _reach_kafka(config: ServiceConfig) -> None:
    """Fail at once, naming the cause, when the brokers refuse our TLS or credentials (``kafka_probe``)."""
    from connectors.kafka_probe import probe

    k = config.kafka
    assert k is not None
    probe(k.client_library, k.bootstrap_servers, revealed(k.client))


def _plain_producer(config: ServiceConfig) -> Any:
    from connectors import kafka as kc

    _reach_kafka(config)
    return kc.KafkaProducer(_kafka_settings(config, "rnnstream"))


def _mqtt_args(config: ServiceConfig, suffix: str) -> dict[str, Any]:
    m = config.mqtt
    return {
        "broker": m.broker,
        "client_id": m.client_id + suffix,
        "username": m.username,
        "password": reveal(m.password),
        "tls": _mqtt_tls(m.tls),
        "keepalive_s": m.keepalive_s,
        "session_expiry_s": m.session_expiry_s,
    }


def _mqtt_tls(tls: MqttTls | None) -> Any:
    """``mqtt.tls`` as ``connectors.mqtt.Tls`` (the key password as text), or None for plaintext."""
    if tls is None:
        return None
    from connectors.mqtt import Tls

    paths = [None if p is None else str(p) for p in (tls.ca_file, tls.cert_file, tls.key_file)]
    return Tls(*paths, key_password=reveal(tls.key_password), check_hostname=tls.check_hostname)


def _source(config: ServiceConfig, kafka: Any) -> Source:
    src = config.source
    if isinstance(src, KafkaSourceConfig):
        from connectors.kafka import KafkaSource

        return KafkaSource(kafka, src.topics, src.feedback_topic, src.max_poll_records)
    if isinstance(src, MqttSourceConfig):
        from connectors.mqtt import MqttSource

        return MqttSource(topic=src.topic, qos=src.qos, **_mqtt_args(config, ""))
    if isinstance(src, SerialSourceConfig):
        from connectors.serial import SerialSource

        return SerialSource(src.port, src.stream_id, src.baudrate)
    if isinstance(src, AUDIO_SOURCES):
        return _audio_source(config)
    if isinstance(src, VideoSourceConfig):
        from connectors.video import VideoSource

        features = _video_features(src, load_bundle(config.model))
        return VideoSource(_expand(src.paths), features, src.speed, src.fps, src.names)
    from connectors.csv import CsvSource

    assert isinstance(src, CsvSourceConfig)
    return CsvSource(_expand(src.paths), src.stream_column, src.timestamp_column, src.speed)


def _audio_source(config: ServiceConfig) -> Source:
    """Microphones or audio files through the audio front end, at the model's feature settings."""
    from connectors.audio import AudioSource
    from rnnstream.speech import feature_settings, microphone_device

    src = config.source
    captures: list = []
    if isinstance(src, MicrophoneSourceConfig):
        from connectors.microphone import Microphone

        names = src.names or [None] * len(src.devices)
        if len(names) != len(src.devices):
            raise ValueError(f"source.names has {len(names)} names for {len(src.devices)} devices")
        for device, name in zip(src.devices, names, strict=True):
            block, buffer = src.block_ms / 1e3, src.buffer_s
            mic = Microphone(microphone_device(device), src.rate, block, buffer, name=name)
            captures.append(mic)
        reopen_s = src.reopen_s
    else:
        from connectors.audio_files import AudioFile

        assert isinstance(src, AudioFilesSourceConfig)
        captures = [AudioFile(p, src.speed) for p in _expand(src.paths)]
        reopen_s = 1.0
    return AudioSource(captures, feature_settings(load_bundle(config.model)), reopen_s=reopen_s)


def _video_features(src: VideoSourceConfig, model: StreamModel) -> Any:
    """The ``connectors.video.FrameFeatures`` of ``src``: each setting left out is the model bundle's
    (``features["video"]``), else the default."""
    from connectors.video import FrameFeatures
    from rnnstream.video import features_of_bundle

    base = features_of_bundle(model.info.features) or FrameFeatures()
    kinds = tuple(src.features) if src.features is not None else base.kinds
    pick = [base.rows if src.rows is None else src.rows, base.cols if src.cols is None else src.cols]
    return FrameFeatures(kinds, *pick, bins=base.bins if src.bins is None else src.bins)


def _expand(patterns: list[str]) -> list[Path]:
    """Files named by ``patterns`` (globs allowed), in order, each once; a pattern matching nothing is
    an error."""
    import glob

    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"source.paths: {pattern!r} matches no file")
        files.extend(Path(m) for m in matches if Path(m) not in files)
    return files


def _decoder(config: ServiceConfig, model: StreamModel) -> MessageDecoder:
    src = config.source
    if config.text is not None:
        return _text_decoder(config, model)
    if isinstance(src, AUDIO_SOURCES):
        from connectors.audio import AudioDecoder

        return AudioDecoder(model.feature_size)
    if isinstance(src, VideoSourceConfig):
        from connectors.video import VideoDecoder

        size = _video_features(src, model).size
        if size != model.feature_size:
            raise ValueError(f"source: frames give {size} features; the model takes {model.feature_size}")
        return VideoDecoder(model.feature_size)
    if isinstance(src, KafkaSourceConfig):
        payload = Decoder(
            src.format, model.feature_size, model.spec.num_embeddings, src.max_timesteps_per_message
        )
        return KeyedDecoder(payload, src.max_message_bytes)
    from connectors.readings import ReadingDecoder

    if len(src.channels) != model.feature_size:
        raise ValueError(
            f"source.channels has {len(src.channels)} channels; the model takes {model.feature_size}"
        )
    return ReadingDecoder(
        channels=list(src.channels),
        max_abs_value=src.max_abs_value,
        max_bytes=src.max_bytes,
        extra_channels=src.extra_channels,
        timestamp_column=getattr(src, "timestamp_column", "timestamp"),
        stream_column=getattr(src, "stream_column", None),
    )


def _forecaster(config: ServiceConfig, engine: Engine, scoring: Scoring) -> Forecaster | None:
    """``forecast: {horizon}``: forecast rollouts in the output documents (``rnnstream.forecast``)."""
    if config.forecast is None:
        return None
    from rnnstream.forecast import Forecaster

    return Forecaster(engine, config.forecast.horizon, scoring)


def _text_decoder(config: ServiceConfig, model: StreamModel) -> MessageDecoder:
    """Text messages through the tokenizer the model ships (``connectors.text``)."""
    from connectors.text import TextDecoder, Tokenizer

    text = config.text
    assert text is not None
    if isinstance(config.source, AUDIO_SOURCES) or not model.categorical:
        raise ValueError("text: needs a message source and a model of token ids (an embedding)")
    tokenizer = Tokenizer.from_features(model.info.features)
    if tokenizer.size > model.spec.num_embeddings:
        raise ValueError(
            f"text: {tokenizer.size} tokens > the model's {model.spec.num_embeddings} embeddings"
        )
    stream_key = getattr(config.source, "stream_column", None) or text.stream_key
    return TextDecoder(tokenizer, text.text_key, text.control_key, stream_key, text.max_bytes)


def _rate_limit(limits: LimitsConfig) -> StreamRateLimit | None:
    """The per-stream rate limit, if ``limits.stream_events_per_s`` is set."""
    rate = limits.stream_events_per_s
    if rate is None:
        return None
    return StreamRateLimit(rate, limits.stream_burst or max(rate, 1.0))


def _checks(config: ServiceConfig) -> ReadingGuard | None:
    """Reading checks: on for sensor sources (defaults unless ``readings:`` says otherwise)."""
    if isinstance(config.source, KafkaSourceConfig | MicrophoneSourceConfig | AudioFilesSourceConfig):
        return None
    if isinstance(config.source, VideoSourceConfig):  # frames are no readings
        return None
    if config.text is not None:  # text messages are no readings
        return None
    r = config.readings or ReadingsConfig()
    return ReadingGuard(len(config.source.channels), r.max_gap_s, r.on_gap, r.flatline_after)


def _scoring(config: ServiceConfig, model: StreamModel) -> Scoring:
    s = config.scoring
    if s.kind == "recognition":
        from rnnstream.speech import RecognitionScoring

        return RecognitionScoring(model)
    if s.kind == "raw" and config.text is not None:
        from rnnstream.text import TextLabels

        return TextLabels(model.info.features.get("classes"), config.text.outputs == "messages")
    if s.kind == "raw":
        return RawOutputs()
    if isinstance(model, UtteranceModel):
        raise ValueError(
            f"scoring.kind {s.kind} reads every step's output: an utterance model has one per end"
        )
    src = config.source
    channels = list(getattr(src, "channels", [f"x{i}" for i in range(model.feature_size)]))
    if model.output_size != model.feature_size:
        raise ValueError(f"scoring.kind {s.kind} needs a model whose output forecasts its input")
    norm = model.info.features.get("normalisation")
    # fields whose default depends on the kind: None leaves the scorer's own default
    per_kind = {
        k: v
        for k in ("short_window", "long_window", "threshold", "refractory")
        if (v := getattr(s, k)) is not None
    }
    if s.kind == "detector":
        return AnomalyDetector(
            channels,
            norm,
            window=s.window,
            learn=s.learn,
            err_window=s.err_window,
            temperature=s.temperature,
            spatial_tolerance=s.spatial_tolerance,
            season_s=s.season_s,
            season_bucket_s=s.season_bucket_s,
            calibration=s.calibration,
            record_discount=s.record_discount,
            forecaster=s.forecaster,
            predicts=model.info.features.get("predicts", "value"),
            **per_kind,
        )
    return ForecastScoring(channels, norm, window=s.window, warmup=s.warmup, **per_kind)


def _sink(config: ServiceConfig, kafka: Any) -> Sink:
    s = config.sink
    if s.type == "kafka":
        from connectors.kafka import KafkaSink

        if kafka is not None:
            return KafkaSink(kafka, s.topic, s.format)
        return KafkaSink(_plain_producer(config), s.topic, s.format, owns=True)
    if s.type == "mqtt":
        from connectors.mqtt import MqttSink

        # ack_timeout_s None: a broker outage pauses the pipeline (backpressure) instead of ending it
        return MqttSink(
            topic=s.topic, qos=s.qos, retain=s.retain, ack_timeout_s=None, **_mqtt_args(config, "-out")
        )
    from connectors import files

    if s.type == "stdout":
        return files.StdoutSink()
    if s.type == "csv":
        return files.CsvSink(s.path, s.columns)
    if s.type == "jsonl":
        return files.JsonLinesSink(s.path)
    return files.NullSink()


def _dead_letters(config: ServiceConfig, kafka: Any) -> DeadLetters:
    d = config.dead_letters
    if d is None or d.type == "file":
        from connectors.files import JsonLinesDeadLetters

        if d is not None:
            return JsonLinesDeadLetters(d.path)
        where = config.checkpoint.dir / "dead-letters.jsonl" if config.checkpoint.dir else Path("-")
        return JsonLinesDeadLetters(where)
    if d.type == "kafka":
        from connectors.kafka import KafkaDeadLetters

        if kafka is not None:
            return KafkaDeadLetters(kafka, d.topic)
        return KafkaDeadLetters(_plain_producer(config), d.topic, owns=True)
    from connectors.mqtt import MqttDeadLetters

    return MqttDeadLetters(topic=d.topic, ack_timeout_s=None, **_mqtt_args(config, "-dlq"))


def _backend(config: ServiceConfig, kafka: Any) -> StateBackend:
    if kafka is not None:
        from connectors.kafka import KafkaChangelog

        return KafkaChangelog(kafka, config.changelog_topic)
    if config.checkpoint.dir is not None:
        return LocalCheckpoint(config.checkpoint.dir)
    return EphemeralState()
