"""``rnnstream demo``: many simulated sensor streams through the shipped LSTM forecaster, live.

Nothing external is needed (no Kafka, no microphone). A producer thread pulls events from
``SimulatedSensors`` and hands each to ``Engine.submit``; the calling thread collects the outputs in
submission order, scores each stream's previous forecast against the value that just arrived, flags
anomalies and refreshes a ``rich`` display about 4 times a second. The demo stops by itself after
``seconds`` and returns a ``DemoSummary``.

Scoring, per stream: the output for the event at sample ``t`` is the forecast for ``t + 1``;
``error = value[t+1] - forecast``. An event is flagged as an anomaly when its error is more than ``k``
standard deviations away from that stream's running (exponentially weighted) error mean, once the stream
has ``warmup`` scored events. Flagged errors do not update the running statistics, and the event right
after a flagged one is not judged either: its forecast was made from the anomalous value.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

import models
from connectors.base import Event
from connectors.simulated import SimulatedSensors
from engine.engine import Engine
from engine.finetune import FineTuneSettings
from engine.stats import EngineStats
from rnnstream.admin import AdminServer

ASSET = Path(models.__file__).parent / "assets" / "sensor_lstm.safetensors"
"""The demo's forecaster, trained by ``scripts/train_demo_model.py``."""

REFRESH_S = 0.25
MAX_IN_FLIGHT = 512
"""Events submitted but not yet scored before the producer waits: bounds queueing latency."""
MAX_DELAY_MS = 0.5
"""The engine's batching delay."""
DEMO_FINETUNE = FineTuneSettings()
"""What ``--finetune`` runs: next-step targets, the defaults."""


@dataclass
class DemoSummary:
    """What a demo run measured.

    ``events`` scored events over ``seconds`` (wall clock); latencies are ``submit`` → output in ms;
    errors are mean absolute forecast errors in sensor units, of the model and of the naive
    "next value = last value" forecast on the same events; ``anomalies`` flagged events, of which
    ``spikes_caught`` were injected spikes (``injected_spikes`` in all). With fine-tuning (``finetune``):
    ``finetune_updates`` updates and ``finetune_versions`` published versions, the first of each
    ``first_update_s`` / ``first_version_s`` seconds after fine-tuning started (NaN: none yet).
    """

    events: int
    seconds: float
    events_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    mean_abs_error: float
    anomalies: int
    naive_abs_error: float = math.nan
    injected_spikes: int = 0
    spikes_caught: int = 0
    streams: int = 0
    mean_batch_size: float = 0.0
    device: str = ""
    finetune: bool = False
    finetune_updates: int = 0
    finetune_versions: int = 0
    first_update_s: float = math.nan
    first_version_s: float = math.nan

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@dataclass
class Anomaly:
    """One flagged event: the stream, its sample value and forecast (sensor units), error in sigmas."""

    stream_id: int
    value: float
    forecast: float
    sigmas: float


@dataclass
class ForecastTracker:
    """Per-stream forecast scoring and anomaly flags for streams ``0..num_streams-1`` (scalar per event,
    feature 0). Plain lists, not numpy: one event at a time is faster on lists."""

    num_streams: int
    k: float = 5.0
    warmup: int = 30
    alpha: float = 0.02
    events: int = 0
    scored: int = 0
    abs_error_sum: float = 0.0
    naive_error_sum: float = 0.0
    anomalies: int = 0
    injected: int = 0
    caught: int = 0
    recent: deque[Anomaly] = field(default_factory=lambda: deque(maxlen=5))

    def __post_init__(self) -> None:
        n = self.num_streams
        self.forecast: list[float | None] = [None] * n
        self.last: list[float] = [0.0] * n
        self.count = [0] * n
        self.err_mean = [0.0] * n
        self.err_var = [0.0] * n
        self.flagged = [False] * n

    def update(self, event: Event, output: np.ndarray) -> None:
        """Score the stream's previous forecast against ``event.x[0]``; keep ``output[0]`` as the next."""
        s = int(event.stream_id)
        value = float(event.x[0])  # type: ignore[index]
        self.events += 1
        self.injected += bool(event.label)
        forecast = self.forecast[s]
        if forecast is not None:
            self._score(s, value, forecast, bool(event.label))
        self.forecast[s] = float(output[0])
        self.last[s] = value

    def _score(self, s: int, value: float, forecast: float, spiked: bool) -> None:
        err = value - forecast
        self.scored += 1
        self.abs_error_sum += abs(err)
        self.naive_error_sum += abs(value - self.last[s])
        if self.flagged[s]:  # this forecast was made from an anomalous value: neither flag nor learn
            self.flagged[s] = False
            return
        mean, var = self.err_mean[s], self.err_var[s]
        sigmas = abs(err - mean) / math.sqrt(var) if var > 0 else 0.0
        if self.count[s] >= self.warmup and sigmas > self.k:
            self.flagged[s] = True
            self.anomalies += 1
            self.caught += spiked
            self.recent.append(Anomaly(s, value, forecast, sigmas))
            return
        delta = err - mean
        self.err_mean[s] = mean + self.alpha * delta
        self.err_var[s] = (1 - self.alpha) * (var + self.alpha * delta * delta)
        self.count[s] += 1

    @property
    def mean_abs_error(self) -> float:
        return self.abs_error_sum / self.scored if self.scored else math.nan

    @property
    def naive_abs_error(self) -> float:
        return self.naive_error_sum / self.scored if self.scored else math.nan


def load_demo_model(device: str = "cpu") -> models.StreamModel:
    """The shipped sensor forecaster (``ASSET``)."""
    if not ASSET.is_file():
        raise FileNotFoundError(f"{ASSET} is missing; run scripts/train_demo_model.py to create it")
    return models.load_bundle(ASSET, device=device)


class InFlight:
    """Events submitted and not yet scored, in submission order, at most ``limit`` of them: ``put``
    blocks while full, which bounds how long an event can queue in the engine."""

    def __init__(self, limit: int) -> None:
        self.items: deque[tuple[Event, Future]] = deque()
        self.room = threading.BoundedSemaphore(limit)

    def put(self, event: Event, future: Future) -> None:
        self.items.append((event, future))

    def wait_for_room(self, stop: threading.Event) -> bool:
        """Block until there is room (True) or ``stop`` is set (False)."""
        while not self.room.acquire(timeout=0.05):
            if stop.is_set():
                return False
        return True

    def pop(self) -> None:
        self.items.popleft()
        self.room.release()


@dataclass
class _Run:
    """One demo run's moving parts, shared by the scoring loop and the producer thread."""

    engine: Engine
    tracker: ForecastTracker
    in_flight: InFlight
    stop: threading.Event
    seconds: float
    start: float = 0.0
    failures: list[BaseException] = field(default_factory=list)


def _produce(run: _Run, source: SimulatedSensors, normalisation: dict[str, float]) -> None:
    """Producer thread: standardise each event's value and ``submit`` it, waiting while the in-flight
    window is full. An exception stops the run; ``run_demo`` re-raises it."""
    mean, inv_std = normalisation["mean"], 1.0 / normalisation["std"]
    engine, in_flight, stop = run.engine, run.in_flight, run.stop
    try:
        for event in source:
            if stop.is_set() or not in_flight.wait_for_room(stop):
                return
            in_flight.put(event, engine.submit(event.stream_id, (event.x - mean) * inv_std))
    except BaseException as exc:
        run.failures.append(exc)
        stop.set()


def _drain(in_flight: InFlight, tracker: ForecastTracker, until: float) -> None:
    """Score events in submission order, waiting for each output, until ``until`` (``time.monotonic``);
    with ``until = inf``, until nothing is left in flight."""
    items = in_flight.items
    while (now := time.monotonic()) < until:
        if not items:
            if math.isinf(until):
                return
            time.sleep(1e-3)
            continue
        event, future = items[0]
        try:
            output = future.result(timeout=None if math.isinf(until) else until - now)
        except TimeoutError:
            return
        in_flight.pop()
        tracker.update(event, output)


@dataclass
class _Progress:
    """What the display shows at one refresh."""

    elapsed: float
    rate: float
    stats: EngineStats
    tracker: ForecastTracker


def _fmt_ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f} ms"


def _render(p: _Progress, title: str) -> Panel:
    t, s = p.tracker, p.stats
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", justify="right")
    grid.add_column()
    grid.add_row("elapsed", f"{p.elapsed:.1f} s")
    grid.add_row("events", f"{t.events:,}  ({p.rate:,.0f} events/s)")
    grid.add_row("mean batch", f"{s.mean_batch_size:.1f} events/step")
    grid.add_row("latency", f"p50 {_fmt_ms(s.latency_p50_ms)}   p99 {_fmt_ms(s.latency_p99_ms)}")
    grid.add_row("streams", f"{s.active_streams:,} active   {s.pending:,} queued")
    grid.add_row("forecast error", f"{t.mean_abs_error:.4f} (naive last-value {t.naive_abs_error:.4f})")
    grid.add_row("anomalies", f"{t.anomalies:,} flagged   ({t.caught:,} of {t.injected:,} injected spikes)")
    if s.finetune is not None:
        grid.add_row("fine-tuning", _finetune_line(s.finetune))
    parts: list[Table] = [grid]
    if t.recent:
        recent = Table("stream", "value", "forecast", "σ", title="latest anomalies", title_justify="left")
        for a in reversed(t.recent):
            recent.add_row(str(a.stream_id), f"{a.value:+.3f}", f"{a.forecast:+.3f}", f"{a.sigmas:.1f}")
        parts.append(recent)
    return Panel(Group(*parts), title=title, expand=False)


def _finetune_line(f: dict) -> str:
    return (
        f"{f['state']}: serving v{f['serving_version']}, "
        f"{f['updates']:,} updates ({f['updates_per_s']:.1f}/s), "
        f"{f['published']} published, {f['rolled_back']} rolled back, train loss {f['train_loss']:.4f}; "
        f"first update {_fmt_s(f['first_update_s'])}, first version {_fmt_s(f['first_version_s'])}"
    )


def _fmt_s(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"after {v:.1f} s"


def _plain(p: _Progress) -> str:
    s, t = p.stats, p.tracker
    line = (
        f"[{p.elapsed:5.1f}s] events={t.events} rate={p.rate:.0f}/s batch={s.mean_batch_size:.1f} "
        f"p50={s.latency_p50_ms:.2f}ms p99={s.latency_p99_ms:.2f}ms mae={t.mean_abs_error:.4f} "
        f"naive={t.naive_abs_error:.4f} anomalies={t.anomalies}"
    )
    return line + (f" finetune: {_finetune_line(s.finetune)}" if s.finetune is not None else "")


def _run_loop(run: _Run, show: Callable[[_Progress], None], every_s: float) -> None:
    """Score events and call ``show`` every ``every_s`` until ``run.seconds`` have passed since
    ``run.start`` or the producer stopped. The rate shown is over about the last second."""
    start, end, tracker = run.start, run.start + run.seconds, run.tracker
    history = deque([(start, 0)], maxlen=max(2, round(1.0 / every_s) + 1))
    while (now := time.monotonic()) < end and not run.stop.is_set():
        _drain(run.in_flight, tracker, min(now + every_s, end))
        now = time.monotonic()
        history.append((now, tracker.events))
        (t0, n0), (t1, n1) = history[0], history[-1]
        show(_Progress(now - start, (n1 - n0) / max(t1 - t0, 1e-9), run.engine.stats(), tracker))


def summary_table(summary: DemoSummary) -> Table:
    """The end-of-run table."""
    s = summary
    table = Table(title="rnnstream demo summary", show_header=False)
    table.add_column(style="bold cyan", justify="right")
    table.add_column()
    table.add_row("streams", f"{s.streams:,} on {s.device}")
    table.add_row("events", f"{s.events:,} in {s.seconds:.2f} s")
    table.add_row("throughput", f"{s.events_per_s:,.0f} events/s")
    table.add_row("mean batch", f"{s.mean_batch_size:.1f} events/step")
    table.add_row("latency", f"p50 {_fmt_ms(s.latency_p50_ms)}   p99 {_fmt_ms(s.latency_p99_ms)}")
    table.add_row("forecast error", f"{s.mean_abs_error:.4f} (naive last-value {s.naive_abs_error:.4f})")
    caught = f"({s.spikes_caught:,} of {s.injected_spikes:,} injected spikes)"
    table.add_row("anomalies", f"{s.anomalies:,} flagged   {caught}")
    if s.finetune:
        table.add_row(
            "fine-tuning",
            f"{s.finetune_updates:,} updates, {s.finetune_versions} versions published; first update "
            f"{_fmt_s(s.first_update_s)}, first version {_fmt_s(s.first_version_s)}",
        )
    return table


def run_demo(
    num_streams: int = 1000,
    seconds: float = 10.0,
    rate: float | None = None,
    device: str = "auto",
    console: Console | None = None,
    live: bool = True,
    seed: int = 0,
    finetune: bool = False,
    admin_port: int | None = None,
) -> DemoSummary:
    """Run the demo for ``seconds`` over ``num_streams`` streams at ``rate`` total events/s (``None``:
    as fast as possible) on ``device``; ``live=False`` prints plain progress lines instead of the live
    display (for CI / no TTY). Ctrl-C ends it early. Prints a summary table and returns the
    ``DemoSummary``. ``finetune``: run the online fine-tuning worker (next-step targets) beside it;
    ``admin_port``: serve ``/metrics``, ``/stats`` and ``/finetune/*`` there (0: any free port)."""
    console = console or Console()
    model = load_demo_model()
    source = SimulatedSensors(num_streams, rate_hz=rate, seed=seed)
    with Engine(model, device=device, capacity=num_streams, max_delay_ms=MAX_DELAY_MS) as engine:
        _warm_up(engine)
        if finetune:
            engine.start_finetuning(DEMO_FINETUNE)
        admin = AdminServer(engine, admin_port) if admin_port is not None else None
        if admin is not None:
            console.print(
                f"admin endpoint: http://{admin.address}/metrics, /stats, POST /finetune/pause|resume|stop"
            )
        title = f"rnnstream demo: {num_streams:,} sensor streams → LSTM forecaster on {engine.device}"
        run = _Run(engine, ForecastTracker(num_streams), InFlight(MAX_IN_FLIGHT), threading.Event(), seconds)
        args = (run, source, model.info.features["normalisation"])
        producer = threading.Thread(target=_produce, args=args, name="rnnstream-demo-producer", daemon=True)
        with _frozen_gc():
            run.start = time.monotonic()
            producer.start()
            try:
                _show_progress(run, console, live, title)
            except KeyboardInterrupt:
                console.print("interrupted: stopping early")
            finally:
                run.stop.set()
                source.close()
                producer.join()
            _drain(run.in_flight, run.tracker, math.inf)
            elapsed = time.monotonic() - run.start
            stats = engine.stats()
            if admin is not None:
                admin.close()
    if run.failures:
        raise run.failures[0]
    summary = _summarise(run.tracker, stats, elapsed, num_streams)
    console.print(summary_table(summary))
    return summary


@contextmanager
def _frozen_gc() -> Iterator[None]:
    """Hide every object alive now from the cyclic garbage collector for the run. Torch keeps ~200k
    objects alive; each full collection over them stops every thread for ~100 ms, which would be the
    demo's p99 latency."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _warm_up(engine: Engine) -> None:
    """One throwaway event through the step loop (first-call costs: allocator, kernels), then fresh stats."""
    engine.submit("__warm_up__", np.zeros(engine.model.feature_size, np.float32)).result()
    engine.end("__warm_up__")
    engine.reset_stats()


def _show_progress(run: _Run, console: Console, live: bool, title: str) -> None:
    """The scoring loop under a live display, or with a plain line about every ``seconds / 5``."""
    if not live:
        console.print(title, highlight=False, soft_wrap=True)

        def show_line(p: _Progress) -> None:
            console.print(_plain(p), highlight=False, soft_wrap=True)

        _run_loop(run, show_line, max(REFRESH_S, min(2.0, run.seconds / 5)))
        return
    with Live(console=console, auto_refresh=False, transient=False) as display:

        def show_panel(p: _Progress) -> None:
            display.update(_render(p, title), refresh=True)

        _run_loop(run, show_panel, REFRESH_S)


def _summarise(tracker: ForecastTracker, stats: EngineStats, elapsed: float, streams: int) -> DemoSummary:
    f = stats.finetune or {}
    first_update, first_version = f.get("first_update_s"), f.get("first_version_s")
    return DemoSummary(
        finetune=stats.finetune is not None,
        finetune_updates=f.get("updates", 0),
        finetune_versions=f.get("published", 0),
        first_update_s=math.nan if first_update is None else first_update,
        first_version_s=math.nan if first_version is None else first_version,
        events=tracker.events,
        seconds=round(elapsed, 3),
        events_per_s=tracker.events / elapsed if elapsed > 0 else 0.0,
        latency_p50_ms=stats.latency_p50_ms,
        latency_p99_ms=stats.latency_p99_ms,
        mean_abs_error=tracker.mean_abs_error,
        anomalies=tracker.anomalies,
        naive_abs_error=tracker.naive_abs_error,
        injected_spikes=tracker.injected,
        spikes_caught=tracker.caught,
        streams=streams,
        mean_batch_size=stats.mean_batch_size,
        device=stats.device,
    )
