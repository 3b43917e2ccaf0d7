"""The ``rnnstream`` command line: ``run``, ``demo``, ``bench``, ``detect``, ``nab``, ``transcribe``,
``listen``, ``kafka``/``mqtt``/``audio`` ``up/down/status``, ``info``, ``finetune``, ``train``."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="rnnstream: streaming real-time inference for RNN, GRU and LSTM models.",
    no_args_is_help=True,
    add_completion=False,
)
kafka_app = typer.Typer(help="A local Apache Kafka broker for development and tests.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
REPO_ROOT = Path(__file__).resolve().parents[1]
mqtt_app = typer.Typer(help="A local Mosquitto MQTT broker for development and tests.", no_args_is_help=True)
app.add_typer(mqtt_app, name="mqtt")
finetune_app = typer.Typer(
    help="Control the fine-tuning worker of a running process through its admin endpoint.",
    no_args_is_help=True,
)
app.add_typer(finetune_app, name="finetune")
train_app = typer.Typer(help="Train the shipped models from the data in ../shared.", no_args_is_help=True)
app.add_typer(train_app, name="train")
audio_app = typer.Typer(
    help="A headless sound server (PulseAudio with a null sink) for machines without a sound card.",
    no_args_is_help=True,
)
app.add_typer(audio_app, name="audio")
console = Console()


FATAL_EXIT_S = 10.0
"""After a fatal error the process ends within this many seconds, whatever its threads do."""


class BenchSuite(StrEnum):
    engine = "engine"
    kafka = "kafka"
    finetune = "finetune"
    sensors = "sensors"
    audio = "audio"
    architectures = "architectures"


@app.command()
def demo(
    streams: Annotated[int, typer.Option(help="Number of simulated sensor streams.")] = 1000,
    seconds: Annotated[float, typer.Option(help="How long to run.")] = 10.0,
    rate: Annotated[float | None, typer.Option(help="Total events/s (default: as fast as possible).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    live: Annotated[bool, typer.Option(help="Live display (off: plain progress lines).")] = True,
    finetune: Annotated[bool, typer.Option(help="Fine-tune the model online (next-step targets).")] = False,
    admin_port: Annotated[int | None, typer.Option(help="Serve /metrics, /stats, /finetune/* here.")] = None,
) -> None:
    """Run simulated sensor streams through the shipped LSTM forecaster, with a live display."""
    from rnnstream.demo import run_demo

    run_demo(
        num_streams=streams,
        seconds=seconds,
        rate=rate,
        device=device,
        console=console,
        live=live and console.is_terminal,
        finetune=finetune,
        admin_port=admin_port,
    )


@app.command()
def bench(
    suite: Annotated[BenchSuite, typer.Argument(help="Which benchmark suite.")] = BenchSuite.engine,
    quick: Annotated[bool, typer.Option(help="A short smoke run (smaller sizes).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (engine suite).")] = "auto",
    json_path: Annotated[Path | None, typer.Option("--json", help="Where to write the results.")] = None,
) -> None:
    """Run a benchmark suite: print its tables and write machine-readable JSON."""
    argv = ["--quick"] if quick else []
    if json_path is not None:
        argv += ["--json", str(json_path)]
    if suite is BenchSuite.kafka:
        from benchmarks import kafka_bench

        raise typer.Exit(kafka_bench.main(argv))
    if suite is BenchSuite.finetune:
        from benchmarks import finetune_bench

        raise typer.Exit(finetune_bench.main(argv))
    if suite is BenchSuite.sensors:
        from benchmarks import sensors_bench

        raise typer.Exit(sensors_bench.main(argv))
    if suite is BenchSuite.audio:
        from benchmarks import audio_bench

        raise typer.Exit(audio_bench.main(argv))
    if suite is BenchSuite.architectures:
        from benchmarks import architectures_bench

        raise typer.Exit(architectures_bench.main(argv))
    from benchmarks import engine_bench

    raise typer.Exit(engine_bench.main(["--device", device, *argv]))


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline configuration (YAML), e.g. configs/kafka.yaml.")],
    bootstrap: Annotated[str | None, typer.Option(help="Override kafka.bootstrap_servers.")] = None,
    broker: Annotated[str | None, typer.Option(help="Override mqtt.broker (HOST:PORT).")] = None,
    instance_id: Annotated[str | None, typer.Option(help="Override kafka.instance_id.")] = None,
    log_level: Annotated[str, typer.Option(help="Python logging level.")] = "INFO",
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log JSON lines (ts, level, logger, message).")
    ] = False,
) -> None:
    """Run a pipeline: source → decode → engine → sink, with checkpointed state; stops cleanly on
    SIGTERM/SIGINT (or at the end of a finite source)."""
    from rnnstream.process import logging_to_stderr

    overrides = {}
    if bootstrap:
        overrides["kafka.bootstrap_servers"] = bootstrap
    if broker:
        overrides["mqtt.broker"] = broker
    if instance_id:
        overrides["kafka.instance_id"] = instance_id
    with logging_to_stderr(log_level, json_lines=log_json):
        _run_pipeline(config, overrides)


def _run_pipeline(config: Path, overrides: dict[str, str]) -> None:
    import logging

    from rnnstream.config import ConfigError, load_config
    from rnnstream.process import exit_within
    from rnnstream.service import build_pipeline

    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        cfg = load_config(config, overrides)
        pipeline = build_pipeline(cfg)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]config error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    except (OSError, RuntimeError) as exc:  # a broker that cannot be reached, a file that cannot be read
        console.print(f"[red]cannot start:[/red] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(1) from exc
    try:
        pipeline.run()
    except Exception as exc:  # fatal: end promptly with status 1, so that a supervisor restarts us
        logging.getLogger("rnnstream").error("fatal: %s: %s", type(exc).__name__, exc, exc_info=True)
        exit_within(FATAL_EXIT_S, 1)  # even if a library thread that is not a daemon will not stop
        raise typer.Exit(1) from exc
    c = pipeline.counters
    typer.echo(
        f"stopped: {c.messages} messages, {c.events} events, {c.dead_letters} dead letters, "
        f"{c.checkpoints} checkpoints",
        err=True,
    )


@app.command()
def check(
    config: Annotated[Path, typer.Argument(help="Pipeline configuration (YAML).")],
) -> None:
    """Validate a pipeline configuration without running it: every key, the model and its fit to the
    source, the files it names. Exit 0 when it would start, 2 naming the key when not (brokers are not
    contacted)."""
    from rnnstream.config import ConfigError, load_config
    from rnnstream.service import check as check_config

    try:
        summary = check_config(load_config(config))
    except (ConfigError, ValueError, OSError) as exc:
        console.print(f"[red]config error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    typer.echo(f"ok: {summary}")


@app.command()
def detect(
    files: Annotated[
        list[Path], typer.Argument(help="CSV files with timestamp,value columns; one stream each.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for <name>.csv and <name>.png (created if missing).")],
    labels: Annotated[
        Path | None, typer.Option(help="NAB combined_windows.json: labelled windows shaded in the plots.")
    ] = None,
    plot: Annotated[bool, typer.Option(help="Also write <name>.png: values, score, alerts.")] = True,
) -> None:
    """Score CSV files for anomalies, all concurrently in one pipeline, one stream each. Writes
    OUT/<name>.csv per file (name: the file's stem; two files of one name are refused, exit 2) with
    every data row of the input in its order: timestamp,value (as the input has them),anomaly_score,
    the scorer's other fields, refused (why a row was refused: NaN, bad timestamp, duplicate or out of
    order...; such a row has anomaly_score 0), and OUT/<name>.png: values, score, alerts, labelled
    windows."""
    from rnnstream.detect import DetectError
    from rnnstream.detect import detect as run_detect

    try:
        reports = run_detect(files, out, labels, plot)
    except DetectError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except (OSError, RuntimeError) as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    for r in reports:
        written = ", ".join(str(p) for p in (r.csv, r.png) if p is not None)
        typer.echo(f"{r.name}: {r.rows:,} rows, {r.alerts} alerts, {r.refused} refused -> {written}")


@app.command()
def nab(
    data: Annotated[Path, typer.Option(help="NAB's data folder: <category>/<file>.csv.")],
    labels: Annotated[Path, typer.Option(help="NAB's labels/combined_windows.json.")],
    online: Annotated[bool, typer.Option(help="Adapt the forecaster online (--no-online: frozen).")] = True,
    calibration: Annotated[bool, typer.Option(help="Anomaly likelihood (off: raw surprise).")] = True,
    refractory: Annotated[bool, typer.Option(help="Refractory period after an alert.")] = True,
    record: Annotated[bool, typer.Option(help="Discount scores below the stream's best so far.")] = True,
    season: Annotated[bool, typer.Option(help="Compare with the same time a week before.")] = True,
    forecaster: Annotated[str, typer.Option(help="model, or last (naive last value).")] = "model",
) -> None:
    """Score the anomaly detector on NAB files: the three profiles, windows hit, false positives, runtime.
    The options switch parts of the detector off, for ablations."""
    from rnnstream.detect import Variant
    from rnnstream.detect import nab as run_nab

    if forecaster not in ("model", "last"):
        raise typer.BadParameter("--forecaster is model or last")
    report = run_nab(data, labels, Variant(online, calibration, refractory, record, season, forecaster))
    table = Table(title=f"NAB: {report.files} files, {report.rows:,} rows, {report.seconds:.1f} s")
    for col in ("profile", "score", "threshold", "windows hit", "false positives"):
        table.add_column(col, justify="left" if col == "profile" else "right")
    for name, r in report.profiles.items():
        table.add_row(
            name,
            f"{r.score:.1f}",
            f"{r.threshold:.4g}",
            f"{r.windows_hit}/{r.windows}",
            str(r.false_positives),
        )
    console.print(table)


@app.command()
def info(bundle: Annotated[Path, typer.Argument(help="A model bundle (.safetensors).")]) -> None:
    """Describe a model bundle: architecture, version, feature settings."""
    from models import load_bundle

    model = load_bundle(bundle)
    table = Table(title=str(bundle), show_header=False)
    for key, value in model.spec.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("version", str(model.info.version))
    table.add_row("features", json.dumps(model.info.features))
    table.add_row("trained_on", json.dumps(model.info.trained_on))
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    console.print(table)


@kafka_app.command("up")
def kafka_up(
    brokers: Annotated[int, typer.Option(help="1 for development, 3 for scale-out tests.")] = 1,
) -> None:
    """Start a local KRaft broker (or cluster) on free ports; prints its bootstrap address."""
    from rnnstream import kafka_broker

    cluster = kafka_broker.up(brokers=brokers)
    typer.echo(cluster.bootstrap)


@kafka_app.command("down")
def kafka_down() -> None:
    """Stop the local broker started by ``rnnstream kafka up``."""
    from rnnstream import kafka_broker

    stopped = kafka_broker.down()
    console.print("stopped" if stopped else "no broker was running")


@kafka_app.command("status")
def kafka_status() -> None:
    """Print the running local broker's bootstrap address, if any."""
    from rnnstream import kafka_broker

    cluster = kafka_broker.status()
    if cluster is None:
        console.print("no broker is running")
        raise typer.Exit(1)
    typer.echo(cluster.bootstrap)


@mqtt_app.command("up")
def mqtt_up(
    port: Annotated[int | None, typer.Option(help="127.0.0.1 port to listen on (default: free).")] = None,
) -> None:
    """Start a local Mosquitto broker (persistent, no queue limits); prints its HOST:PORT."""
    from rnnstream import mqtt_broker

    broker = mqtt_broker.up(port=port)
    typer.echo(broker.address)


@mqtt_app.command("down")
def mqtt_down() -> None:
    """Stop the local broker started by ``rnnstream mqtt up``."""
    from rnnstream import mqtt_broker

    stopped = mqtt_broker.down()
    console.print("stopped" if stopped else "no broker was running")


@mqtt_app.command("status")
def mqtt_status() -> None:
    """Print the running local MQTT broker's HOST:PORT, if any."""
    from rnnstream import mqtt_broker

    broker = mqtt_broker.status()
    if broker is None:
        console.print("no broker is running")
        raise typer.Exit(1)
    typer.echo(broker.address)


AdminOption = Annotated[str, typer.Option("--admin", help="HOST:PORT of the process's admin endpoint.")]


def _finetune_call(action: str, admin: str) -> None:
    from rnnstream.admin import call_admin

    try:
        if action == "status":
            stats = call_admin(admin, "/stats").get("finetune")
            if stats is None:
                raise RuntimeError("fine-tuning is not enabled in that process")
        else:
            stats = call_admin(admin, f"/finetune/{action}", post=True)
    except (RuntimeError, OSError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    table = Table(title=f"fine-tuning at {admin}", show_header=False)
    for key, value in stats.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    console.print(table)


@finetune_app.command("status")
def finetune_status(admin: AdminOption = "127.0.0.1:9100") -> None:
    """Show the worker's progress: state, updates, losses, serving version."""
    _finetune_call("status", admin)


@finetune_app.command("pause")
def finetune_pause(admin: AdminOption = "127.0.0.1:9100") -> None:
    """Pause training after the current round (inference goes on; events are still recorded)."""
    _finetune_call("pause", admin)


@finetune_app.command("resume")
def finetune_resume(admin: AdminOption = "127.0.0.1:9100") -> None:
    """Resume training."""
    _finetune_call("resume", admin)


@finetune_app.command("stop")
def finetune_stop(admin: AdminOption = "127.0.0.1:9100") -> None:
    """Stop training for good in that process (the serving weights stay)."""
    _finetune_call("stop", admin)


@train_app.command("digits")
def train_digits(
    data: Annotated[Path, typer.Option(help="FSDD recordings folder.")] = REPO_ROOT.parent
    / "shared"
    / "data"
    / "fsdd"
    / "recordings",
    out: Annotated[Path | None, typer.Option(help="Bundle to write (default: the shipped asset).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 40,
    seed: int = 0,
    leave_out_speaker: Annotated[
        str | None, typer.Option(help="Hold out all of this speaker's recordings instead of 5-9.")
    ] = None,
    threads: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    """Train the spoken-digit recognizer (GRU over MFCCs) on FSDD; writes the bundle and its .log.json."""
    from rnnstream.digits import ASSET, DigitsConfig, main

    cfg = DigitsConfig(seed=seed, epochs=epochs, held_out_speaker=leave_out_speaker, threads=threads)
    if leave_out_speaker and out is None:
        raise typer.BadParameter(
            "--leave-out-speaker trains an experiment: give --out (not the shipped asset)"
        )
    result = main(data, out or ASSET, cfg)
    typer.echo(json.dumps(result))


@app.command()
def transcribe(
    files: Annotated[list[Path], typer.Argument(help="Audio files (WAV, FLAC, ...; any rate, mono or not).")],
    model: Annotated[
        Path | None, typer.Option(help="Recognizer bundle (default: the shipped digits).")
    ] = None,
    speed: Annotated[
        float | None, typer.Option(help="Replay at this many times real pace (default: as fast as possible).")
    ] = None,
) -> None:
    """Recognise the spoken digits in audio files, replayed through the live path (the pipeline's audio
    source: 100 ms chunks, resampling, MFCC, endpointing, recognizer), all files at once as concurrent
    streams. One JSON line per utterance: file, start_s, end_s, label, confidence. A file that cannot be
    used gets one line on stderr and the others go on (exit 1 at the end)."""
    from rnnstream.digits import ASSET
    from rnnstream.speech import transcribe as run

    failed = 0
    for result in run(files, model or ASSET, speed):
        for note in result.notes:
            typer.echo(f"{result.path}: note: {note}", err=True)
        if result.error is not None:
            failed += 1
            typer.echo(f"{result.path}: error: {result.error}", err=True)
            continue
        if not result.recognitions:
            typer.echo(f"{result.path}: no speech found", err=True)
        for r in result.recognitions:
            keys = ("start_s", "end_s", "label", "confidence")
            typer.echo(json.dumps({"file": str(result.path), **{k: r[k] for k in keys}}))
    if failed:
        raise typer.Exit(1)


@app.command()
def listen(
    device: Annotated[
        str | None,
        typer.Option(
            help="Input device name (or part of it) or index. Default: the sound server of "
            "`rnnstream audio up` when it runs, else the system's default input."
        ),
    ] = None,
    count: Annotated[int | None, typer.Option(help="Exit after this many utterances.", min=1)] = None,
    timeout: Annotated[float | None, typer.Option(help="Exit after this many seconds.", min=0)] = None,
    rate: Annotated[int | None, typer.Option(help="Capture rate in Hz (default: the device's).")] = None,
    model: Annotated[
        Path | None, typer.Option(help="Recognizer bundle (default: the shipped digits).")
    ] = None,
) -> None:
    """Recognise spoken digits from a microphone as they are said: one JSON line per utterance (stream,
    start_s, end_s, label, confidence), with a live view when stdout is a terminal."""
    from rnnstream.process import logging_to_stderr

    with logging_to_stderr("WARNING"):
        _listen(device, count, timeout, rate, model)


def _listen(
    device: str | None, count: int | None, timeout: float | None, rate: int | None, model: Path | None
) -> None:
    import threading
    import time

    from connectors.microphone import find_input_device
    from rnnstream.digits import ASSET
    from rnnstream.speech import listener, microphone_device

    chosen = int(device) if device is not None and device.isdigit() else device
    try:
        _, info = find_input_device(microphone_device(chosen))
    except (ValueError, OSError) as exc:  # OSError: PortAudio itself is missing
        console.print(f"[red]no microphone:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    heard: list[dict] = []
    started = time.monotonic()
    live_view = console.is_terminal

    def on_recognition(doc: dict) -> None:
        heard.append(doc)
        line = json.dumps({k: doc[k] for k in ("stream", "start_s", "end_s", "label", "confidence")})
        if live_view:
            console.print(line, highlight=False, soft_wrap=True)
        else:
            typer.echo(line)
        if count is not None and len(heard) >= count:
            pipeline.stop()

    pipeline, source = listener(chosen, on_recognition, rate, model or ASSET)
    if timeout is not None:
        timer = threading.Timer(timeout, pipeline.stop)
        timer.daemon = True
        timer.start()

    def view() -> Table:
        c = source.counters()
        mic = source.captures[0]
        table = Table(title=f"listening: {info['name']} at {mic.rate or '?'} Hz", title_justify="left")
        for col in ("elapsed", "utterances", "last", "overflows", "dropped samples", "device lost"):
            table.add_column(col, justify="right")
        last = f"{heard[-1]['label']} ({heard[-1]['confidence']:.2f})" if heard else "-"
        table.add_row(
            f"{time.monotonic() - started:.0f} s",
            str(len(heard)),
            last,
            str(c.get("overflows", 0)),
            str(c.get("dropped_samples", 0)),
            str(c.get("lost", 0)),
        )
        return table

    typer.echo(f"listening: {info['name']} (Ctrl-C stops)", err=True)
    if live_view:
        from rich.live import Live

        with Live(get_renderable=view, console=console, refresh_per_second=4, transient=True):
            pipeline.run()
    else:
        pipeline.run()
    counts = source.counters()
    typer.echo(
        f"stopped: {len(heard)} utterances, {counts.get('overflows', 0)} overflows, "
        f"{counts.get('dropped_samples', 0)} dropped samples, {counts.get('lost', 0)} device losses",
        err=True,
    )


@audio_app.command("up")
def audio_up(
    rate: Annotated[
        int, typer.Option(help="The null sink's rate in Hz (48 kHz: like most microphones).")
    ] = 48000,
) -> None:
    """Start a headless PulseAudio with a null sink (sound played into it is captured as from a
    microphone); prints the device name to pass to `listen --device`."""
    from rnnstream import pulseaudio

    try:
        server = pulseaudio.up(rate=rate)
    except pulseaudio.AudioServerError as exc:
        console.print(f"[red]cannot start the sound server:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    typer.echo(server.device)
    hint = f"play into it: {_env_line(server.env)} paplay --device={server.sink} FILE.wav"
    typer.echo(hint, err=True)


@audio_app.command("down")
def audio_down() -> None:
    """Stop the sound server started by `rnnstream audio up`."""
    from rnnstream import pulseaudio

    console.print("stopped" if pulseaudio.down() else "no sound server was running")


@audio_app.command("status")
def audio_status() -> None:
    """Print the running sound server's device name, if any."""
    from rnnstream import pulseaudio

    server = pulseaudio.status()
    if server is None:
        console.print("no sound server is running")
        raise typer.Exit(1)
    typer.echo(server.device)


def _env_line(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(env.items()))


if __name__ == "__main__":
    app()
