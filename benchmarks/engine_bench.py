"""Engine benchmark: throughput, latency and state memory of ``Engine`` against what users write without it.

Run ``python -m benchmarks.engine_bench [--quick] [--json PATH] [--device cpu|cuda|auto] [--threads N]``.

Workload: RNN (tanh), GRU and LSTM, hidden 64 at input sizes 16 and 32, hidden 256 at input 32, one
layer, float32, 10,000 streams, every event's stream id drawn uniformly at random (random interleaving).

- Throughput (events/s): ``Engine.step_many`` over chunks of 4096 events; a naive baseline (a dict of
  per-stream states and one ``nn.*Cell`` call per event); a stateless baseline that re-runs the whole
  ``nn.LSTM/GRU/RNN`` over each stream's last 64 events for every event.
- The queued entry points, LSTM-64, closed loop from one thread: ``submit()`` one event at a time, and
  ``submit_many()`` in batches of 4096 (feeding the step loop), next to ``step_many`` on the same engine.
- GFLOP/s of the engine, against a large float32 ``torch.matmul`` on the same device, in the same run.
- Latency (ms) of ``submit()`` in an open loop at half the closed-loop sustainable rate, measured from each
  event's *scheduled* time (no coordinated omission): default settings, ``max_delay_ms=0``, and (on CPU
  with several torch threads) default settings with one torch thread, which leaves a core to the
  submitting thread. Counters beside each row explain it: the CPU time of the step loop's thread and of
  the submitting thread over the open loop (share of wall time), the loop's CPU time per batch, and the
  loop thread's context switches per batch (voluntary: it blocked on the GIL or the queue; involuntary:
  another thread or process took its core).
- State memory (bytes) of 1,000,000 LSTM-64 streams, in a fresh subprocess.

Every comparison is a ratio of figures measured in the same run. Rates are the best of a few rounds,
interleaved between the engine and the baselines, so a burst of load from other processes slows every
contender alike and the best round shows what each can do.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from rich.table import Table
from torch import nn

from benchmarks.report import bench_console, publish
from engine.engine import Engine, resolve_device
from models.convert import from_torch

Progress = Callable[[str], None]

INPUT_SIZE = 32
INPUT_SIZES_H64 = (16, 32)  # hidden 64 runs at both; hidden 256 at INPUT_SIZE
NUM_STREAMS = 10_000
CHUNK = 4096
WINDOW = 64
HIDDEN_SIZES = (64, 256)
MEMORY_HIDDEN = 64
MEMORY_CHUNK = 65_536
DEFAULT_JSON = Path("results/engine_bench.json")
REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINE_THREADS: int | None = None  # torch threads of every engine made here (None: the engine's default)

# cell kind -> (sequence module, cell module, gate count G)
CELLS: dict[str, tuple[type[nn.RNNBase], type[nn.RNNCellBase], int]] = {
    "rnn_tanh": (nn.RNN, nn.RNNCell, 1),
    "gru": (nn.GRU, nn.GRUCell, 3),
    "lstm": (nn.LSTM, nn.LSTMCell, 4),
}

TARGETS: dict[str, float] = {
    "engine_over_naive_min_h64": 50.0,  # RNN, GRU and LSTM at hidden 64, input 16 and 32
    "engine_over_window_min_lstm64": 200.0,
    "pct_of_matmul_min_h256": 60.0,
    "submit_min_eps": 150_000.0,  # submit() from one thread, LSTM-64
    "submit_many_min_eps": 1_000_000.0,  # submit_many() from one thread, LSTM-64
    "latency_p99_max_ms": 2.0,
    "memory_ratio_max": 1.2,
}
SUBMIT_MANY_CHUNK = 4096  # events per submit_many call
# A fixed offered rate for one more latency row, near the previous round's "half the max rate" (33,892/s):
# it shows the engine's latency apart from the submitting thread's share of the GIL at the full target rate.
REFERENCE_RATE = 30_000.0


@dataclass(frozen=True)
class BenchConfig:
    """How long each measurement runs. Durations in seconds of timed work, per round."""

    quick: bool
    rounds: int  # throughput rounds (best of)
    latency_rounds: int  # closed-loop submit rounds (best of)
    engine_s: float
    naive_s: float
    window_s: float
    matmul_s: float
    closed_loop_s: float
    open_loop_s: float
    pool_chunks: int
    memory_streams: int


FULL = BenchConfig(False, 5, 3, 0.5, 0.4, 0.4, 0.3, 1.0, 3.0, 48, 1_000_000)
QUICK = BenchConfig(True, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.3, 0.5, 6, 100_000)


# ---- helpers ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_rate(block: Callable[[int], int], seconds: float) -> float:
    """Call ``block(i)`` (it returns how many events it ran) until ``seconds`` passed; events/s."""
    done = 0
    i = 0
    start = time.perf_counter()
    while True:
        done += block(i)
        i += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def _best_rates(blocks: dict[str, Callable[[int], int]], seconds: dict[str, float], rounds: int) -> dict:
    """Best events/s of each contender over ``rounds`` interleaved rounds."""
    best = dict.fromkeys(blocks, 0.0)
    for _ in range(rounds):
        for name, block in blocks.items():
            best[name] = max(best[name], _timed_rate(block, seconds[name]))
    return best


def make_events(
    rng: np.random.Generator, n: int, input_size: int = INPUT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` events: ids ``(n,) int64`` uniform in ``[0, NUM_STREAMS)``, features ``(n, input_size)``
    float32."""
    ids = rng.integers(0, NUM_STREAMS, size=n, dtype=np.int64)
    xs = rng.standard_normal((n, input_size), dtype=np.float32)
    return ids, xs


def flops_per_event(cell: str, hidden: int, input_size: int = INPUT_SIZE) -> int:
    """Multiply-adds x2 of one timestep: ``2 * (I*G*H + H*G*H)``, G = gate count."""
    gates = CELLS[cell][2]
    return 2 * (input_size * gates * hidden + hidden * gates * hidden)


def build_modules(
    cell: str, hidden: int, device: torch.device, input_size: int = INPUT_SIZE
) -> tuple[nn.RNNBase, nn.RNNCellBase]:
    """A random ``nn.RNN/GRU/LSTM`` (batch_first) and the ``nn.*Cell`` with the same weights, in eval mode."""
    seq_cls, cell_cls, _ = CELLS[cell]
    seq = seq_cls(input_size, hidden, num_layers=1, batch_first=True).eval()
    single = cell_cls(input_size, hidden).eval()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(single, name).copy_(getattr(seq, f"{name}_l0"))
    return seq.to(device), single.to(device)


# ---- machine ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class BackgroundCpu:
    """CPU used by *other* processes while a measurement runs, in cores (averaged over wall time).

    Machine-wide busy CPU time minus this process's (its threads and waited-for children). Noise meter:
    with 2 cores, 0.5 means another process took a quarter of the machine.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + sum(getattr(t, k, 0.0) for k in ("irq", "softirq", "steal"))
        own = psutil.Process().cpu_times()
        return time.perf_counter(), busy, own.user + own.system + own.children_user + own.children_system

    def cores(self) -> float:
        """Average cores used by other processes since this meter was created."""
        end = self._sample()
        wall = end[0] - self._start[0]
        return max(0.0, (end[1] - self._start[1]) - (end[2] - self._start[2])) / wall if wall > 0 else 0.0


def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine the figures come from: CPU, cores, memory, library versions, device."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
    return info


# ---- 1-4: throughput -------------------------------------------------------------------------------------
def engine_block(engine: Engine, chunks: list[tuple[np.ndarray, np.ndarray]]) -> Callable[[int], int]:
    """One ``step_many`` call of chunk ``i`` (cycling) per call."""

    def block(i: int) -> int:
        ids, xs = chunks[i % len(chunks)]
        engine.step_many(ids, xs)
        return len(ids)

    return block


def naive_block(
    single: nn.RNNCellBase, ids: list[int], rows: list[torch.Tensor], device: torch.device, size: int = 256
) -> Callable[[int], int]:
    """What a user writes without the engine: a dict of states, one cell call per event.

    Every stream starts with a state (the cell's output for a zero input), as after a warm-up.
    """
    with torch.no_grad():
        start = single(torch.zeros(1, single.input_size, device=device))
    states: dict[int, Any] = dict.fromkeys(range(NUM_STREAMS), start)

    def block(i: int) -> int:
        lo = (i * size) % len(ids)
        with torch.no_grad():
            for sid, x in zip(ids[lo : lo + size], rows[lo : lo + size], strict=True):
                h = states.get(sid)
                states[sid] = single(x[None], h)
        _sync(device)
        return min(size, len(ids) - lo)

    return block


def window_block(
    seq: nn.RNNBase, ids: list[int], rows: list[np.ndarray], device: torch.device, size: int = 4
) -> Callable[[int], int]:
    """Stateless recompute: per event, re-run the whole module over the stream's last ``WINDOW`` inputs.

    Every stream's window starts full (``WINDOW`` earlier events), so each event really runs ``WINDOW`` steps.
    """
    warm = rows[:WINDOW]
    windows = {sid: deque(warm, maxlen=WINDOW) for sid in range(NUM_STREAMS)}

    def block(i: int) -> int:
        lo = (i * size) % len(ids)
        with torch.no_grad():
            for sid, x in zip(ids[lo : lo + size], rows[lo : lo + size], strict=True):
                window = windows[sid]
                window.append(x)
                seq_in = torch.from_numpy(np.stack(window)).to(device).unsqueeze(0)
                out, _ = seq(seq_in)
                _ = out[0, -1]
        _sync(device)
        return min(size, len(ids) - lo)

    return block


def matmul_size(device: torch.device) -> int:
    """Side of the square float32 reference matmul: 2048, or 4096 on CUDA."""
    return 4096 if device.type == "cuda" else 2048


def matmul_block(device: torch.device) -> Callable[[int], int]:
    """One ``matmul_size`` x ``matmul_size`` float32 ``torch.matmul`` per call (returns 1)."""
    n = matmul_size(device)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def block(_: int) -> int:
        torch.matmul(a, b)
        _sync(device)
        return 1

    block(0)
    return block


def matmul_gflops(matmuls_per_s: float, device: torch.device) -> float:
    """GFLOP/s of ``matmuls_per_s`` reference matmuls (``2 * n**3`` FLOPs each)."""
    return matmuls_per_s * 2 * matmul_size(device) ** 3 / 1e9


def _warm_engine(engine: Engine, chunks: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Create every stream (steady state: no admissions while timed) and run a few chunks."""
    width = chunks[0][1].shape[1]
    engine.step_many(np.arange(NUM_STREAMS), np.zeros((NUM_STREAMS, width), dtype=np.float32))
    for ids, xs in chunks[:3]:
        engine.step_many(ids, xs)


def throughput_config(
    cell: str, hidden: int, device: torch.device, cfg: BenchConfig, seed: int, input_size: int = INPUT_SIZE
) -> dict[str, Any]:
    """Engine, naive and window events/s for one cell kind, hidden and input size, with ratios and GFLOP/s.

    The reference matmul runs in the same interleaved rounds (``matmul_gflops_alongside``); the run's
    best matmul becomes the denominator of ``pct_of_matmul`` (``finish_throughput``).
    """
    gc.collect()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    seq, single = build_modules(cell, hidden, device, input_size)
    chunks = [make_events(rng, CHUNK, input_size) for _ in range(cfg.pool_chunks)]
    base_ids, base_xs = make_events(rng, 16_384, input_size)
    id_list = base_ids.tolist()
    with Engine(from_torch(seq), device=device, capacity=NUM_STREAMS, num_threads=ENGINE_THREADS) as engine:
        _warm_engine(engine, chunks)
        blocks = {
            "engine": engine_block(engine, chunks),
            "naive": naive_block(single, id_list, list(torch.from_numpy(base_xs).to(device)), device),
            "window": window_block(seq, id_list, list(base_xs), device),
            "matmul": matmul_block(device),
        }
        for block in blocks.values():  # warm-up
            block(0)
        seconds = {"engine": cfg.engine_s, "naive": cfg.naive_s, "window": cfg.window_s}
        seconds["matmul"] = cfg.matmul_s
        background = BackgroundCpu()
        rates = _best_rates(blocks, seconds, cfg.rounds)
        other_cpu = background.cores()
    flops = flops_per_event(cell, hidden, input_size)
    return {
        "cell": cell,
        "hidden": hidden,
        "input": input_size,
        "engine_eps": rates["engine"],
        "naive_eps": rates["naive"],
        "window_eps": rates["window"],
        "engine_over_naive": rates["engine"] / rates["naive"],
        "engine_over_window": rates["engine"] / rates["window"],
        "flops_per_event": flops,
        "gflops": rates["engine"] * flops / 1e9,
        "matmul_gflops_alongside": matmul_gflops(rates["matmul"], device),
        "background_cpu_cores": other_cpu,
    }


def finish_throughput(rows: list[dict[str, Any]], matmul: float) -> None:
    """Add ``pct_of_matmul`` (against ``matmul`` GFLOP/s) and the pass/fail ``checks`` to each row."""
    for row in rows:
        row["pct_of_matmul"] = 100.0 * row["gflops"] / matmul
        row["checks"] = _throughput_checks(row)


def _throughput_checks(row: dict[str, Any]) -> dict[str, bool]:
    if row["hidden"] == 64:
        checks = {"engine_over_naive": row["engine_over_naive"] >= TARGETS["engine_over_naive_min_h64"]}
        if row["cell"] == "lstm":
            checks["engine_over_window"] = (
                row["engine_over_window"] >= TARGETS["engine_over_window_min_lstm64"]
            )
        return checks
    if row["hidden"] == 256:
        return {"pct_of_matmul": row["pct_of_matmul"] >= TARGETS["pct_of_matmul_min_h256"]}
    return {}


# ---- 5: submit() throughput and latency ------------------------------------------------------------------
def _submit_events(seed: int) -> tuple[list[int], list[np.ndarray]]:
    ids, xs = make_events(np.random.default_rng(seed), 1 << 16)
    return ids.tolist(), list(xs)


def _thread_cpu_s(thread: threading.Thread) -> float:
    """CPU seconds ``thread`` has used (Linux: its per-thread clock; NaN where there is none)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident or 0))
    except (AttributeError, OSError):
        return math.nan


def _context_switches(thread: threading.Thread) -> tuple[float, float]:
    """``(voluntary, involuntary)`` context switches of ``thread`` so far (Linux; NaN elsewhere).
    Voluntary: it blocked (waiting for the GIL, a lock, a condition, a sleep); involuntary: the OS took its
    core away (another runnable thread or process)."""
    counts = {"voluntary_ctxt_switches": math.nan, "nonvoluntary_ctxt_switches": math.nan}
    try:
        with open(f"/proc/self/task/{thread.native_id}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in counts:
                    counts[key] = float(value)
    except (OSError, ValueError):
        pass
    return counts["voluntary_ctxt_switches"], counts["nonvoluntary_ctxt_switches"]


def _new_latency_engine(max_delay_ms: float | None, device: torch.device, seed: int) -> Engine:
    """An LSTM-64 engine holding all ``NUM_STREAMS`` streams; ``max_delay_ms=None`` keeps the default."""
    torch.manual_seed(seed)
    model = from_torch(nn.LSTM(INPUT_SIZE, 64, batch_first=True))
    kwargs = {} if max_delay_ms is None else {"max_delay_ms": max_delay_ms}
    # the thread count in force (the bench's, or a latency row's own): an Engine sets it process-wide
    engine = Engine(model, device=device, capacity=NUM_STREAMS, num_threads=torch.get_num_threads(), **kwargs)
    engine.step_many(np.arange(NUM_STREAMS), np.zeros((NUM_STREAMS, INPUT_SIZE), dtype=np.float32))
    return engine


def submit_closed_loop(engine: Engine, ids: list[int], rows: list[np.ndarray], seconds: float) -> float:
    """Submit as fast as one thread can for ``seconds``, then wait for every event; events/s overall.

    Futures are not kept (the engine completes them in submission order, so waiting for the last one
    waits for all): a harness holding ~100k futures would slow the garbage collector, not the engine.
    """
    n = len(ids)
    errors = engine.stats().errors
    last: Future | None = None
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(256):
            last = engine.submit(ids[count % n], rows[count % n])
            count += 1
    assert last is not None
    last.result()
    elapsed = time.perf_counter() - start
    if engine.stats().errors != errors:
        raise RuntimeError("the engine failed events during the closed-loop benchmark")
    return count / elapsed


def _stamp(done: list[float], i: int, finished: threading.Event | None, future: Future) -> None:
    """Done-callback: completion time of event ``i`` (perf_counter seconds), inf if it failed."""
    done[i] = time.perf_counter() if future.exception() is None else math.inf
    if finished is not None:
        finished.set()


def submit_open_loop(
    engine: Engine, ids: list[int], rows: list[np.ndarray], rate: float, seconds: float
) -> np.ndarray:
    """Latencies (ms) of ``rate * seconds`` events, event ``i`` scheduled at ``t0 + i / rate``.

    The generator sleeps until an event is due and submits every due event at once when behind;
    latency runs from the scheduled time to the future's completion (stamped by a done-callback), so a
    stalled submitter or engine is charged for every event it delayed (no coordinated omission).
    """
    n_events = max(1, int(rate * seconds))
    n = len(ids)
    done = [math.nan] * n_events
    finished = threading.Event()  # set by the last event's callback; callbacks run in completion order
    t0 = time.perf_counter()
    i = 0
    while i < n_events:
        now = time.perf_counter()
        due = min(n_events, int((now - t0) * rate) + 1)
        if due <= i:
            time.sleep(max(0.0, t0 + i / rate - now))
            continue
        for k in range(i, due):
            future = engine.submit(ids[k % n], rows[k % n])
            future.add_done_callback(partial(_stamp, done, k, finished if k == n_events - 1 else None))
        i = due
    if not finished.wait(timeout=60 + seconds):
        raise RuntimeError("open-loop events did not complete within a minute")
    latency_ms = (np.asarray(done) - (t0 + np.arange(n_events) / rate)) * 1e3
    if not np.isfinite(latency_ms).all():
        raise RuntimeError("the engine failed events during the open-loop benchmark")
    return latency_ms


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: leave as is)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_row(
    max_delay_ms: float | None,
    device: torch.device,
    cfg: BenchConfig,
    rate: float | None,
    seed: int,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Closed-loop submit rate, then open-loop latency percentiles at ``rate`` (half the closed-loop rate
    when None) for one ``max_delay_ms`` setting (None: the engine's default) and torch thread count."""
    gc.collect()
    ids, rows = _submit_events(seed)
    with _torch_threads(torch_threads):
        return _latency_measure(max_delay_ms, device, cfg, rate, seed, ids, rows)


def _latency_measure(
    max_delay_ms: float | None,
    device: torch.device,
    cfg: BenchConfig,
    rate: float | None,
    seed: int,
    ids: list[int],
    rows: list[np.ndarray],
) -> dict[str, Any]:
    engine = _new_latency_engine(max_delay_ms, device, seed)
    try:
        submit_closed_loop(engine, ids, rows, min(0.2, cfg.closed_loop_s))  # warm-up
        rounds = range(cfg.latency_rounds)
        closed = max(submit_closed_loop(engine, ids, rows, cfg.closed_loop_s) for _ in rounds)
        offered = rate if rate is not None else closed / 2
        engine.reset_stats()
        background = BackgroundCpu()
        loop_cpu, own_cpu, wall = _thread_cpu_s(engine._thread), time.thread_time(), time.perf_counter()
        switches = _context_switches(engine._thread)
        lat = submit_open_loop(engine, ids, rows, offered, cfg.open_loop_s)
        wall = time.perf_counter() - wall
        loop_cpu, own_cpu = _thread_cpu_s(engine._thread) - loop_cpu, time.thread_time() - own_cpu
        switches = tuple(b - a for a, b in zip(switches, _context_switches(engine._thread), strict=True))
        other_cpu = background.cores()
        stats = engine.stats()
    finally:
        engine.close()
    p50, p99, p999 = np.percentile(lat, [50, 99, 99.9])
    effective = _default_max_delay_ms() if max_delay_ms is None else max_delay_ms
    return {
        "max_delay_ms": effective,
        "torch_threads": torch.get_num_threads(),
        "default_setting": max_delay_ms is None,
        "closed_loop_eps": closed,
        "offered_eps": offered,
        "events": len(lat),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "p999_ms": float(p999),
        "max_ms": float(lat.max()),
        "mean_batch_events": stats.events / max(1, stats.batches),
        "loop_cpu_share": loop_cpu / wall,  # the step loop's thread: CPU seconds per wall second
        "submitter_cpu_share": own_cpu / wall,  # the submitting thread (the open-loop generator)
        "loop_cpu_ms_per_batch": 1e3 * loop_cpu / max(1, stats.batches),
        "loop_waits_per_batch": switches[0] / max(1, stats.batches),  # blocked: GIL, queue condition
        "loop_preempted_per_batch": switches[1] / max(1, stats.batches),  # core taken by another thread
        "background_cpu_cores": other_cpu,
        "checks": {"p99": float(p99) <= TARGETS["latency_p99_max_ms"]},
    }


def _default_max_delay_ms() -> float:
    return float(inspect.signature(Engine).parameters["max_delay_ms"].default)


def submit_many_closed_loop(
    engine: Engine, chunks: list[tuple[np.ndarray, np.ndarray]], seconds: float
) -> float:
    """``submit_many`` of one chunk after another from this thread for ``seconds`` (the queue's
    ``max_pending`` holds it back when the step loop falls behind), then wait for the last; events/s.
    The engine resolves items in queue order: the last future done means every one is."""
    count = 0
    last: Future | None = None
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds:
        ids, xs = chunks[i % len(chunks)]
        last = engine.submit_many(ids, xs)
        count += len(ids)
        i += 1
    assert last is not None
    last.result()
    return count / (time.perf_counter() - start)


def submit_rates(device: torch.device, cfg: BenchConfig, seed: int, submit_eps: float) -> dict[str, Any]:
    """The queued entry points against their targets, LSTM-64 (input 32), closed loop from one thread:
    ``submit_many`` in chunks of ``SUBMIT_MANY_CHUNK`` and, for reference, ``step_many`` of the same chunks
    on the same engine, interleaved (best of ``cfg.latency_rounds``); ``submit_eps`` measured before."""
    gc.collect()
    rng = np.random.default_rng(seed)
    chunks = [make_events(rng, SUBMIT_MANY_CHUNK) for _ in range(max(4, cfg.pool_chunks // 4))]
    engine = _new_latency_engine(None, device, seed)
    try:
        submit_many_closed_loop(engine, chunks, min(0.2, cfg.closed_loop_s))  # warm-up
        errors = engine.stats().errors
        blocks = {"step_many": engine_block(engine, chunks)}
        many = step = 0.0
        for _ in range(cfg.latency_rounds):
            many = max(many, submit_many_closed_loop(engine, chunks, cfg.closed_loop_s))
            step = max(step, _timed_rate(blocks["step_many"], cfg.closed_loop_s))
        if engine.stats().errors != errors:
            raise RuntimeError("the engine failed events during the submit_many benchmark")
    finally:
        engine.close()
    return {
        "cell": "lstm",
        "hidden": 64,
        "input": INPUT_SIZE,
        "submit_eps": submit_eps,
        "submit_many_eps": many,
        "submit_many_chunk": SUBMIT_MANY_CHUNK,
        "step_many_eps": step,
        "checks": {
            "submit": submit_eps >= TARGETS["submit_min_eps"],
            "submit_many": many >= TARGETS["submit_many_min_eps"],
        },
    }


# ---- 6: memory (in a fresh subprocess) -------------------------------------------------------------------
def _malloc_trim() -> bool:
    """Hand freed heap pages back to the OS (glibc) so RSS counts live memory only."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _settled_rss() -> int:
    gc.collect()
    _malloc_trim()
    return psutil.Process().memory_info().rss


def measure_memory(streams: int, device: torch.device) -> dict[str, Any]:
    """State memory of ``streams`` LSTM-64 streams (input 32), created with ``step_many`` in chunks of
    65,536 new ids. Bytes; ratios against the raw state ``streams * (64 + 64) * 4``. Run it in a fresh
    process: RSS growth counts everything the process gained after the model was built and run once."""
    torch.manual_seed(0)
    model = from_torch(nn.LSTM(INPUT_SIZE, MEMORY_HIDDEN, batch_first=True)).to(device)
    with torch.no_grad():  # first-use allocations of the kernels are not state
        model.step(torch.zeros(MEMORY_CHUNK, INPUT_SIZE, device=device), model.initial_state(MEMORY_CHUNK))
    rng = np.random.default_rng(0)
    rss_before = _settled_rss()
    dev_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    engine = Engine(model, device=device)
    for start in range(0, streams, MEMORY_CHUNK):
        n = min(MEMORY_CHUNK, streams - start)
        xs = rng.standard_normal((n, INPUT_SIZE), dtype=np.float32)
        engine.step_many(list(range(start, start + n)), xs)
        del xs
    rss_after = _settled_rss()
    stats = engine.stats()
    raw = streams * (MEMORY_HIDDEN + MEMORY_HIDDEN) * 4
    result: dict[str, Any] = {
        "streams": stats.active_streams,
        "capacity": stats.capacity,
        "raw_bytes": raw,
        "state_bytes": stats.state_bytes,
        "state_ratio": stats.state_bytes / raw,
        "rss_growth_bytes": rss_after - rss_before,
        "rss_ratio": (rss_after - rss_before) / raw,
    }
    if device.type == "cuda":
        grown = torch.cuda.memory_allocated(device) - dev_before
        result.update(device_growth_bytes=grown, device_ratio=grown / raw)
    engine.close()
    return result


def memory_in_subprocess(streams: int, device: torch.device, threads: int | None) -> dict[str, Any]:
    """``measure_memory`` in a new interpreter running this module with the hidden ``--memory-child`` flag."""
    cmd = [sys.executable, "-m", "benchmarks.engine_bench", "--memory-child", str(streams)]
    cmd += ["--device", str(device)] + (["--threads", str(threads)] if threads else [])
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"memory benchmark subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    key = "device_ratio" if device.type == "cuda" else "rss_ratio"
    result["checks"] = {key: result[key] <= TARGETS["memory_ratio_max"]}
    return result


# ---- the whole run ---------------------------------------------------------------------------------------
def run_engine_benchmarks(
    device: str = "auto",
    quick: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every benchmark; returns a JSON-able dict (rates in events/s, latencies in ms, sizes in bytes).

    ``quick`` shortens every measurement (well under a minute) and uses 100,000 streams for memory.
    ``threads``: torch intra-op threads of every engine (and so of the baselines, process-wide); default:
    the engine's (all cores but one).
    """
    global ENGINE_THREADS
    say = progress or (lambda _msg: None)
    cfg = QUICK if quick else FULL
    ENGINE_THREADS = threads
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but CUDA is not available")
    started = time.perf_counter()
    background = BackgroundCpu()
    results: dict[str, Any] = {"machine": machine_info(dev), "settings": _settings(cfg), "targets": TARGETS}
    rows = []
    for seed, (cell, hidden, width) in enumerate(throughput_configs()):
        say(f"throughput {cell} hidden {hidden} input {width} (with naive, window and matmul reference)")
        rows.append(throughput_config(cell, hidden, dev, cfg, seed, width))
    best = max(r["matmul_gflops_alongside"] for r in rows)
    results["matmul"] = {"n": matmul_size(dev), "dtype": "float32", "gflops": best}
    finish_throughput(rows, best)
    results["throughput"] = rows
    results["machine"]["torch_threads"] = torch.get_num_threads()  # what the engines set, not torch's default
    say("submit() closed loop and open-loop latency, default max_delay_ms")
    default = latency_row(None, dev, cfg, None, seed=100)
    say("open-loop latency, max_delay_ms=0")
    results["latency"] = [default, latency_row(0.0, dev, cfg, default["offered_eps"], seed=100)]
    if dev.type == "cpu" and torch.get_num_threads() > 1:
        say("open-loop latency, default max_delay_ms, 1 torch thread")
        one = latency_row(None, dev, cfg, default["offered_eps"], seed=100, torch_threads=1)
        results["latency"].append(one)
    say(f"open-loop latency, default max_delay_ms, {REFERENCE_RATE:,.0f} events/s offered (reference)")
    reference = latency_row(None, dev, cfg, REFERENCE_RATE, seed=100)
    reference["reference_rate"] = True
    reference["checks"] = {}
    results["latency"].append(reference)
    say(f"submit_many() closed loop, chunks of {SUBMIT_MANY_CHUNK}, and step_many on the same engine")
    results["submit"] = submit_rates(dev, cfg, 200, default["closed_loop_eps"])
    say(f"memory: {cfg.memory_streams:,} LSTM-64 streams in a subprocess")
    results["memory"] = memory_in_subprocess(cfg.memory_streams, dev, threads)
    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    results["machine"]["background_cpu_cores"] = background.cores()
    return results


def _settings(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "quick": cfg.quick,
        "rounds": cfg.rounds,
        "latency_rounds": cfg.latency_rounds,
        "input_size": INPUT_SIZE,
        "input_sizes_h64": list(INPUT_SIZES_H64),
        "streams": NUM_STREAMS,
        "chunk_events": CHUNK,
        "window": WINDOW,
        "dtype": "float32",
        "engine_round_s": cfg.engine_s,
        "baseline_round_s": cfg.naive_s,
        "closed_loop_s": cfg.closed_loop_s,
        "open_loop_s": cfg.open_loop_s,
        "memory_streams": cfg.memory_streams,
        "default_max_delay_ms": _default_max_delay_ms(),
    }


def throughput_configs() -> list[tuple[str, int, int]]:
    """``(cell, hidden, input size)`` of every throughput row: hidden 64 at each of ``INPUT_SIZES_H64``,
    the other hidden sizes at ``INPUT_SIZE``."""
    return [
        (cell, hidden, width)
        for cell in CELLS
        for hidden in HIDDEN_SIZES
        for width in (INPUT_SIZES_H64 if hidden == 64 else (INPUT_SIZE,))
    ]


# ---- tables ----------------------------------------------------------------------------------------------
def _mark(ok: bool | None) -> str:
    if ok is None:
        return ""
    return " [green]✓[/]" if ok else " [red]✗[/]"


def _eps(v: float) -> str:
    return f"{v:,.0f}"


def _table(title: str, columns: Sequence[str]) -> Table:
    t = Table(title=title, title_justify="left", caption_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    return t


def _throughput_table(results: dict[str, Any]) -> Table:
    cols = (
        "cell",
        "hidden",
        "input",
        "engine",
        "naive",
        "window",
        "engine/naive",
        "engine/window",
        "GFLOP/s",
        "% of matmul",
        "bg CPU",
    )
    t = _table("Throughput (events/s)", cols)
    for r in results["throughput"]:
        checks = r["checks"]
        t.add_row(
            r["cell"],
            str(r["hidden"]),
            str(r.get("input", INPUT_SIZE)),
            _eps(r["engine_eps"]),
            _eps(r["naive_eps"]),
            _eps(r["window_eps"]),
            f"{r['engine_over_naive']:.1f}×{_mark(checks.get('engine_over_naive'))}",
            f"{r['engine_over_window']:.0f}×{_mark(checks.get('engine_over_window'))}",
            f"{r['gflops']:.1f}",
            f"{r['pct_of_matmul']:.0f}%{_mark(checks.get('pct_of_matmul'))}",
            f"{r['background_cpu_cores']:.2f}",
        )
    mm, tg = results["matmul"], results["targets"]
    t.caption = (
        f"{_machine_caption(results)}\n"
        "FLOPs/event = 2·(I·G·H + H·G·H), I = input, G = 1 (RNN), 3 (GRU), 4 (LSTM); "
        f"matmul = {mm['n']}×{mm['n']} float32 torch.matmul, {mm['gflops']:.1f} GFLOP/s: best of the run, "
        "timed in every row's rounds on the same device.\n"
        f"{NUM_STREAMS:,} streams, random interleaving. engine: step_many, chunks of {CHUNK}. "
        "naive: dict of states + one nn.*Cell call per event. "
        f"window: whole nn.RNN/GRU/LSTM over the stream's last {WINDOW} events, per event.\n"
        f"Rates: best of {results['settings']['rounds']} interleaved rounds. "
        "bg CPU: cores other processes used meanwhile.\n"
        f"Targets: engine/naive ≥ {tg['engine_over_naive_min_h64']:g}× at hidden 64; engine/window ≥ "
        f"{tg['engine_over_window_min_lstm64']:g}× for LSTM-64; ≥ {tg['pct_of_matmul_min_h256']:g}% of "
        "matmul at hidden 256."
    )
    return t


def _submit_table(results: dict[str, Any]) -> Table:
    s, tg = results["submit"], results["targets"]
    t = _table(
        f"Queued entry points: LSTM hidden {s['hidden']}, input {s['input']}, one thread, closed loop",
        ("entry point", "events/s", "target"),
    )
    checks = s["checks"]
    t.add_row(
        "submit(), one event a call",
        _eps(s["submit_eps"]) + _mark(checks["submit"]),
        f"≥ {_eps(tg['submit_min_eps'])}",
    )
    t.add_row(
        f"submit_many(), {s['submit_many_chunk']:,} events a call",
        _eps(s["submit_many_eps"]) + _mark(checks["submit_many"]),
        f"≥ {_eps(tg['submit_many_min_eps'])}",
    )
    t.add_row(
        f"step_many(), {s['submit_many_chunk']:,} events a call (reference)", _eps(s["step_many_eps"]), ""
    )
    t.caption = (
        f"{_machine_caption(results)}\n"
        f"{NUM_STREAMS:,} streams, random interleaving. submit/submit_many: submit for the round's time, "
        "then wait for the last result; the step loop runs on its own thread. step_many: on the calling "
        "thread, same engine and chunks. Best of the rounds."
    )
    return t


def _latency_table(results: dict[str, Any]) -> Table:
    cols = (
        "max_delay_ms",
        "threads",
        "max rate/s",
        "offered/s",
        "events",
        "mean batch",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "loop CPU",
        "ms/batch",
        "waits/b",
        "preempt/b",
        "subm CPU",
        "bg CPU",
    )
    t = _table("Latency: submit() → result, LSTM hidden 64, open loop", cols)
    for r in results["latency"]:
        label = f"{r['max_delay_ms']:g}" + (" (default)" if r["default_setting"] else "")
        p99 = f"{r['p99_ms']:.3f}{_mark(r['checks'].get('p99'))}"
        t.add_row(
            label,
            str(r["torch_threads"]),
            _eps(r["closed_loop_eps"]),
            _eps(r["offered_eps"]),
            f"{r['events']:,}",
            f"{r['mean_batch_events']:.1f}",
            f"{r['p50_ms']:.3f}",
            p99,
            f"{r['p999_ms']:.3f}",
            f"{r['max_ms']:.3f}",
            f"{r['loop_cpu_share']:.0%}",
            f"{r['loop_cpu_ms_per_batch']:.3f}",
            f"{r['loop_waits_per_batch']:.2f}",
            f"{r['loop_preempted_per_batch']:.2f}",
            f"{r['submitter_cpu_share']:.0%}",
            f"{r['background_cpu_cores']:.2f}",
        )
    t.caption = (
        f"{_machine_caption(results)}\n"
        f"{NUM_STREAMS:,} streams. max rate: closed loop from one thread (submit all, then wait). "
        f"offered: half the default setting's max rate (the target's rate), or {REFERENCE_RATE:,.0f}/s (a "
        "reference row, no target). threads: torch intra-op threads; "
        "mean batch: events per step-loop batch.\nEvent i is scheduled at t0 + i/rate; latency runs "
        "from its scheduled time to its future's completion (no coordinated omission).\n"
        "loop CPU / subm CPU: CPU time of the step loop's thread / of the submitting thread over the open "
        "loop, per wall second; ms/batch: the loop's CPU time per batch; waits/b, preempt/b (per batch): "
        "the loop thread's voluntary context switches (it blocked: the GIL, the queue) / involuntary ones "
        "(the OS gave its core to another thread or process). "
        f"Target p99 ≤ {results['targets']['latency_p99_max_ms']:g} ms."
    )
    return t


def _memory_table(results: dict[str, Any]) -> Table:
    m = results["memory"]
    cols = ("raw state", "capacity (slots)", "state tensors", "state/raw", "RSS growth", "RSS/raw")
    title = f"State memory: {m['streams']:,} LSTM streams, hidden {MEMORY_HIDDEN}, input {INPUT_SIZE}"
    t = _table(title, cols)
    mib = 2.0**20
    t.add_row(
        f"{m['raw_bytes'] / mib:,.1f} MiB",
        f"{m['capacity']:,}",
        f"{m['state_bytes'] / mib:,.1f} MiB",
        f"{m['state_ratio']:.3f}×",
        f"{m['rss_growth_bytes'] / mib:,.1f} MiB",
        f"{m['rss_ratio']:.3f}×{_mark(m['checks'].get('rss_ratio'))}",
    )
    t.caption = (
        f"{_machine_caption(results)}\n"
        f"raw = streams · (64 + 64) · 4 bytes. Streams created by step_many in chunks of {MEMORY_CHUNK:,} "
        "new int ids, in a fresh process;\nRSS growth from before the engine exists to after every stream"
        f" does (gc + malloc_trim first). Target ≤ {results['targets']['memory_ratio_max']:g}×."
    )
    if "device_ratio" in m:
        t.caption += (
            f"\nDevice memory growth {m['device_growth_bytes'] / mib:,.1f} MiB = "
            f"{m['device_ratio']:.3f}×{_mark(m['checks'].get('device_ratio'))}."
        )
    return t


def render_table(results: dict[str, Any]) -> list[Table]:
    """The results as rich tables: throughput, queued entry points, latency, memory."""
    return [
        _throughput_table(results),
        _submit_table(results),
        _latency_table(results),
        _memory_table(results),
    ]


def _machine_caption(results: dict[str, Any]) -> str:
    """CPU model, cores and torch version (and GPU), for every table."""
    m = results["machine"]
    gpu = f", GPU {m['gpu_name']}" if "gpu_name" in m else ""
    return (
        f"Machine: {m['cpu_model']}, {m['logical_cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), device {m['device']}{gpu}."
    )


def machine_line(results: dict[str, Any]) -> str:
    """One line on where the figures come from, with a warning when other load competed for the CPU."""
    m = results["machine"]
    gpu = f", GPU {m['gpu_name']}" if "gpu_name" in m else ""
    line = (
        f"{m['cpu_model']}, {m['logical_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"device {m['device']}{gpu}; load avg at start {m['load_average_1m']:.2f}; other processes used "
        f"{m['background_cpu_cores']:.2f} cores on average; {results['elapsed_s']:.0f} s"
    )
    if m["background_cpu_cores"] > 0.1 * (m["logical_cores"] or 1):
        line += " — WARNING: other processes competed for the CPU; figures are noisy (see bg CPU)"
    return line


# ---- command line ----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run (< 1 min), 100k streams for memory")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the engines (default: theirs)")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, print the tables, write the JSON; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(measure_memory(args.memory_child, resolve_device(args.device))))
        return 0
    console = bench_console()
    results = run_engine_benchmarks(
        args.device, args.quick, progress=lambda msg: console.print(f"[dim]… {msg}[/]"), threads=args.threads
    )
    publish(console, render_table(results), results, args.json)
    console.print(f"[dim]{machine_line(results)}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
