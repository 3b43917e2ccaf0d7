"""Audio benchmark (``rnnstream bench audio``): the spoken-digit recognizer on many live 16 kHz streams.

Streams: 16 kHz mono float32, cut from one "tape" built from the Free Spoken Digit Dataset (8 kHz
recordings resampled to 16 kHz, each followed by a gap of quiet noise, -80 dBFS, 0.5-1.5x the recording's
length, so recordings fill about half of a stream: the duty cycle is printed). Each stream starts at its
own random place on the tape (wrapping around). A tick delivers every stream's next 100 ms chunk:
``rec.push(stream, chunk, rate=16000)`` for all streams, then ``rec.tick()``; only these calls are timed
(cutting the chunks from the tape is the source's work and is not).

1. **Concurrent streams in real time**: the most streams whose compute time stays below the audio's
   duration (real-time factor RTF = compute / audio < 1), over 10 s of audio per stream after 2 s of
   warm-up (``--quick``: 1 s after 0.3 s). Stream counts double from a start (250 in a full run) until
   one fails, then a bisection between the last pass and the first failure. A run stops as soon as its
   compute exceeds the planned audio duration (it cannot pass any more); its RTF is then over the audio
   processed so far. The CPU other processes took meanwhile is printed ("other load", cores); a run with
   more than 0.25 is run again and the better one counts. Target: at least 1,000 streams on 2 cores.
2. **Single-stream RTF**: one stream fed 100 ms chunks, 30 s of audio. Target ≤ 0.01.
3. **Latency a frame adds beyond its hop**: one stream pushed one hop (10 ms) at a time, back to back (not
   paced), 30 s of audio. (a) Each hop's ``push`` + ``tick`` time (features computed, frames stepped
   through the model), over all hops and over the hops inside a recording. (b) Frame out: for every
   frame, the stream time from the push that brought its last sample to the push whose tick computed it
   (samples the front end held back, e.g. in a resampler's output blocks), plus that tick's compute time:
   what (a) is when the front end holds nothing back. The frames are counted by wrapping
   ``connectors.audio.mfcc_frames``. Target: p99 ≤ 1 ms. (c) Label: from the end of a recording to the
   tick that returned its label, the same way. Target: ≤ 150 ms (p99).
4. **Memory per stream, flat over a long run**: process RSS with 1,000 streams over 120 s of audio,
   sampled every 5 s of audio (``--quick``: 50 streams, 3 s); the run stops early past a wall-time cap of
   150 s (the audio it covered is printed). Bytes per stream = (RSS at the first sample - RSS of the new
   recognizer before any stream) / streams; flat = growth from the middle to the end of the run
   ≤ max(2 MiB, 1% of RSS). At the end, RSS again after glibc's ``malloc_trim(0)``: the engine keeps up to
   256 MiB of freed heap (``engine.runtime``), so the first figure includes the ticks' freed temporaries,
   the second only live and fragmented memory.
5. **Baseline, in the same run**: what a user writes without rnnstream: a Python loop over streams, each
   with its own buffer: ``librosa.resample`` 16k → 8k of the chunk (each chunk on its own),
   ``librosa.feature.mfcc`` (the model's settings, ``center=False``) of the new samples with the previous
   frames' overlap carried, then ``torch.nn.GRU`` (the bundle's weights) + the linear head over the new
   frames from the stream's carried hidden state. It has no endpointer and steps every frame (ours steps
   only the frames of utterances). Its streams and RTF are measured the same way, on shorter runs (3 s of
   audio, from 8 streams up), with the torch thread count the recognizer's engine uses (its default,
   cores - 1; ``--baseline-threads`` to change). Not torch's own default (all cores): with 2 threads on
   2 cores, the baseline's tiny GRU calls stalled for up to 2 s whenever another process took a core
   (measured at 16 streams with ~1 core taken by others: RTF 2.7-4.9 with 2 threads, 0.18-0.20 with 1),
   which would flatter the comparison with noise.
6. Anchors (not measured, printed under the tables): Vosk and sherpa-onnx, next to our parameter count.

Every utterance the recognizer labels is matched to the recording under its midpoint on the tape: the
share of right labels is a sanity check that the measured pipeline really recognises (most recordings are
in the model's training split, so it is no accuracy figure).

The machine (CPU model, cores, torch version and threads) is printed with the tables; results go to
``results/audio_bench.json``. ``--profile N`` prints where a tick's time goes at N streams (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import ctypes.util
import gc
import inspect
import io
import math
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from benchmarks.engine_bench import BackgroundCpu, machine_info
from benchmarks.report import bench_console, publish

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO.parent / "shared" / "data" / "fsdd" / "recordings"
DEFAULT_JSON = Path("results/audio_bench.json")
RATE = 16_000
CHUNK_S = 0.1
HOP_S = 0.01
NOISE_DBFS = -80.0
"""The gaps' noise: below every recording's own background (-58 to -70 dB for some speakers), so the
endpointer finds one utterance per recording; at -60 dBFS it merged neighbouring recordings (the floor
follows the quiet lead-in of a recording down, and the louder gap then never reads as silence)."""
LOAD_RETRY_CORES = 0.25
"""A search run during which other processes took more CPU than this (cores) is run again, and the better
of the two counts (a burst of someone else's load is not what the recognizer can do)."""
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before any Engine sets its own
TARGETS = {"streams_min": 1000, "single_rtf_max": 0.01, "latency_p99_max_ms": 1.0, "label_p99_max_ms": 150.0}
ANCHORS = (
    "Vosk: about 2 large-vocabulary streams per core (models ~1.8 GB large, ~50 MB small)",
    "sherpa-onnx streaming zipformer: RTF 0.038 on one thread (~70M parameters)",
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """How long each part runs (seconds of audio per stream unless said otherwise)."""

    quick: bool
    tape_s: float
    warm_s: float
    measure_s: float
    start_streams: int
    bisect_steps: int
    max_streams: int
    naive_start: int
    naive_measure_s: float
    naive_max_streams: int
    single_s: float
    latency_s: float
    memory_streams: int
    memory_s: float
    memory_every_s: float
    memory_wall_s: float  # wall-time cap of the memory run


FULL = Plan(False, 90.0, 2.0, 10.0, 250, 3, 64_000, 8, 3.0, 4096, 30.0, 30.0, 1000, 120.0, 5.0, 150.0)
QUICK = Plan(True, 20.0, 0.3, 1.0, 50, 0, 100, 4, 0.5, 8, 3.0, 3.0, 50, 3.0, 0.5, 10.0)


# ---- the streams -----------------------------------------------------------------------------------------
@dataclass
class Tape:
    """One long signal at ``rate``: recordings separated by quiet noise; ``segments`` (start, end, digit)
    in samples, sorted."""

    audio: np.ndarray
    rate: int
    segments: np.ndarray  # (K, 3) int64
    looped: np.ndarray = field(init=False, repr=False)  # audio + its first chunk, for wrap-free slicing

    def __post_init__(self) -> None:
        self.looped = np.concatenate([self.audio, self.audio[: int(self.rate * CHUNK_S) + 1]])

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.rate

    @property
    def duty(self) -> float:
        return float((self.segments[:, 1] - self.segments[:, 0]).sum() / len(self.audio))

    def digit_at(self, pos: np.ndarray) -> np.ndarray:
        """The digit of the recording covering each sample position (mod the tape), -1 in a gap."""
        pos = np.asarray(pos) % len(self.audio)
        k = np.searchsorted(self.segments[:, 0], pos, side="right") - 1
        inside = (k >= 0) & (pos < self.segments[np.maximum(k, 0), 1])
        return np.where(inside, self.segments[np.maximum(k, 0), 2], -1)

    def chunks(self, offsets: np.ndarray, start: int, size: int) -> list[np.ndarray]:
        """Each stream's ``size`` samples from ``offsets + start`` (views)."""
        t = self.looped
        return [t[p : p + size] for p in ((offsets + start) % len(self.audio)).tolist()]


def build_tape(seconds: float, rate: int, folder: Path = FSDD, seed: int = 0) -> Tape:
    import librosa
    import soundfile

    files = sorted(folder.glob("*.wav"))
    if not files:
        raise FileNotFoundError(f"no FSDD recordings in {folder}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    noise = 10 ** (NOISE_DBFS / 20)
    parts: list[np.ndarray] = []
    segments: list[tuple[int, int, int]] = []
    n = 0

    def gap(length: int) -> None:
        nonlocal n
        parts.append((rng.standard_normal(length) * noise).astype(np.float32))
        n += length

    gap(int(0.5 * rate))
    for k in order:
        if n >= seconds * rate:
            break
        audio, sr = soundfile.read(files[k], dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        if sr != rate:
            mono = librosa.resample(mono, orig_sr=sr, target_sr=rate)
        mono = np.clip(mono, -1.0, 1.0).astype(np.float32)
        segments.append((n, n + len(mono), int(files[k].name[0])))
        parts.append(mono)
        n += len(mono)
        gap(int(len(mono) * rng.uniform(0.5, 1.5)))
    return Tape(np.concatenate(parts), rate, np.array(segments, np.int64))


# ---- the recognizer --------------------------------------------------------------------------------------
def _recognizer_class() -> type:
    from rnnstream.speech import Recognizer

    return Recognizer


def push_takes_rate() -> bool:
    return "rate" in inspect.signature(_recognizer_class().push).parameters


def input_rate() -> int:
    """16 kHz when ``Recognizer.push`` takes a rate; else the model's own rate (noted in the results)."""
    if push_takes_rate():
        return RATE
    from models import load_bundle
    from rnnstream.digits import ASSET

    return int(load_bundle(ASSET).info.features["mfcc"]["sample_rate"])


def new_recognizer() -> Any:
    from models import load_bundle
    from rnnstream.digits import ASSET

    return _recognizer_class()(load_bundle(ASSET))


def _pusher(rec: Any, rate: int) -> Callable[[Any, np.ndarray], None]:
    if "rate" in inspect.signature(rec.push).parameters:
        return lambda sid, x: rec.push(sid, x, rate=rate)
    if rate != rec.sample_rate:
        raise RuntimeError(f"Recognizer.push takes no rate and the tape is at {rate} Hz")
    return rec.push


@dataclass
class StreamRun:
    """What one run of ``streams`` streams measured."""

    streams: int
    audio_s: float = 0.0  # per stream, measured part
    compute_s: float = 0.0
    ticks: list[float] = field(default_factory=list)
    labels: int = 0
    matched: int = 0
    correct: int = 0
    stopped_early: bool = False
    other_cores: float = 0.0  # CPU taken by other processes meanwhile (noise meter)

    @property
    def rtf(self) -> float:
        return self.compute_s / self.audio_s if self.audio_s else math.inf

    def as_dict(self, planned_s: float) -> dict[str, Any]:
        ticks = np.asarray(self.ticks) * 1e3
        return {
            "streams": self.streams,
            "audio_s": self.audio_s,
            "planned_audio_s": planned_s,
            "compute_s": self.compute_s,
            "rtf": self.rtf,
            "realtime": self.rtf < 1.0 and not self.stopped_early,
            "stopped_early": self.stopped_early,
            "tick_p50_ms": float(np.percentile(ticks, 50)) if len(ticks) else math.nan,
            "tick_p99_ms": float(np.percentile(ticks, 99)) if len(ticks) else math.nan,
            "tick_max_ms": float(ticks.max()) if len(ticks) else math.nan,
            "labels": self.labels,
            "labels_matched": self.matched,
            "labels_correct": self.correct,
            "other_processes_cores": self.other_cores,
        }


def run_recognizer(
    tape: Tape, streams: int, warm_s: float, measure_s: float, seed: int = 1, chunk_s: float = CHUNK_S
) -> StreamRun:
    """``streams`` streams through one ``Recognizer`` for ``warm_s`` + ``measure_s`` of audio."""
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, len(tape.audio), streams)
    size = round(chunk_s * tape.rate)
    warm, ticks = round(warm_s / chunk_s), max(1, round(measure_s / chunk_s))
    rec = new_recognizer()
    push = _pusher(rec, tape.rate)
    run = StreamRun(streams)
    ids = list(range(streams))
    meter = None
    try:
        for t in range(warm + ticks):
            if t == warm:
                meter = BackgroundCpu()
            chunks = tape.chunks(offsets, t * size, size)
            start = time.perf_counter()
            for sid, chunk in zip(ids, chunks, strict=True):
                push(sid, chunk)
            found = rec.tick()
            took = time.perf_counter() - start
            _score(tape, offsets, found, run)
            if t >= warm:
                run.compute_s += took
                run.ticks.append(took)
                run.audio_s = round(len(run.ticks) * chunk_s, 6)
                if run.compute_s > measure_s and t + 1 < warm + ticks:
                    run.stopped_early = True  # cannot keep up any more
                    break
        run.other_cores = meter.cores() if meter else 0.0
    finally:
        rec.close()
    return run


def _score(tape: Tape, offsets: np.ndarray, found: list[Any], run: StreamRun) -> None:
    for r in found:
        mid = (r.start_s + r.end_s) / 2
        digit = int(tape.digit_at(np.array([offsets[r.stream] + round(mid * tape.rate)]))[0])
        run.labels += 1
        if digit >= 0:
            run.matched += 1
            run.correct += str(digit) == str(r.label)


# ---- the baseline ----------------------------------------------------------------------------------------
class Baseline:
    """What a user writes without rnnstream (see the module docstring): one Python object per stream."""

    def __init__(self) -> None:
        from torch import nn

        from models import load_bundle
        from rnnstream.digits import ASSET

        bundle = load_bundle(ASSET)
        spec = bundle.spec
        self.mfcc = dict(bundle.info.features["mfcc"])
        self.gru = nn.GRU(spec.input_size, spec.hidden_size, spec.num_layers, batch_first=True).eval()
        self.head = nn.Linear(spec.hidden_size, spec.head_out).eval()
        with torch.no_grad():
            for k, layer in enumerate(bundle.layers):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(self.gru, f"{name}_l{k}").copy_(getattr(layer, name))
            self.head.load_state_dict(bundle.head.linear.state_dict())
        self.carry: dict[Any, np.ndarray] = {}
        self.hidden: dict[Any, torch.Tensor | None] = {}

    def push(self, stream: Any, samples: np.ndarray, rate: int) -> np.ndarray | None:
        """The stream's new samples → its output after the last new frame (or None: no new frame)."""
        import librosa

        m = self.mfcc
        sr, n_fft, hop = m["sample_rate"], m["n_fft"], m["hop_length"]
        y = librosa.resample(samples, orig_sr=rate, target_sr=sr) if rate != sr else samples
        buf = np.concatenate([self.carry.get(stream, np.zeros(0, np.float32)), y])
        if len(buf) < n_fft:
            self.carry[stream] = buf
            return None
        feats = librosa.feature.mfcc(
            y=buf,
            sr=sr,
            n_mfcc=m["n_mfcc"],
            n_fft=n_fft,
            hop_length=hop,
            n_mels=m["n_mels"],
            fmin=m["fmin"],
            fmax=m["fmax"],
            center=False,
        )
        self.carry[stream] = buf[feats.shape[1] * hop :]
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(feats.T, np.float32))[None]
            out, self.hidden[stream] = self.gru(x, self.hidden.get(stream))
            return self.head(out[0, -1]).numpy()


def run_baseline(
    tape: Tape, streams: int, warm_s: float, measure_s: float, threads: int, seed: int = 1
) -> StreamRun:
    """``streams`` streams through ``Baseline`` with ``threads`` torch threads."""
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, len(tape.audio), streams)
    size = round(CHUNK_S * tape.rate)
    warm, ticks = max(1, round(warm_s / CHUNK_S)), max(1, round(measure_s / CHUNK_S))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    base = Baseline()
    run = StreamRun(streams)
    meter = None
    try:
        for t in range(warm + ticks):
            if t == warm:
                meter = BackgroundCpu()
            chunks = tape.chunks(offsets, t * size, size)
            start = time.perf_counter()
            for sid, chunk in enumerate(chunks):
                base.push(sid, chunk, tape.rate)
            took = time.perf_counter() - start
            if t >= warm:
                run.compute_s += took
                run.ticks.append(took)
                run.audio_s = round(len(run.ticks) * CHUNK_S, 6)
                if run.compute_s > measure_s and t + 1 < warm + ticks:
                    run.stopped_early = True
                    break
        run.other_cores = meter.cores() if meter else 0.0
    finally:
        torch.set_num_threads(before)
    return run


# ---- 1 and 5: the most streams in real time --------------------------------------------------------------
def search(
    runner: Callable[[int], StreamRun],
    start: int,
    cap: int,
    bisect_steps: int,
    planned_s: float,
    progress: Progress,
) -> dict[str, Any]:
    """Double from ``start`` until a run fails (or ``cap``), then bisect ``bisect_steps`` times."""
    runs: list[dict[str, Any]] = []

    def attempt(n: int) -> bool:
        r = runner(n).as_dict(planned_s)
        r["rounds"] = 1
        if r["other_processes_cores"] > LOAD_RETRY_CORES:
            progress(f"{n:,} streams: other processes took {r['other_processes_cores']:.2f} cores; again")
            again = runner(n).as_dict(planned_s)
            r = min(r, again, key=lambda x: x["rtf"]) | {"rounds": 2}
        runs.append(r)
        progress(f"{n:,} streams: RTF {r['rtf']:.3f}{'' if r['realtime'] else ' (not real time)'}")
        return r["realtime"]

    best, fail = 0, None
    n = start
    while n <= cap:
        if not attempt(n):
            fail = n
            break
        best, n = n, n * 2
    if fail is not None and best == 0:  # the start fails: go down
        n = start // 2
        while n >= 1:
            if attempt(n):
                best = n
                break
            fail, n = n, n // 2
    for _ in range(bisect_steps):
        if fail is None or fail - best <= max(1, best // 20):
            break
        mid = (best + fail) // 2
        if attempt(mid):
            best = mid
        else:
            fail = mid
    runs.sort(key=lambda r: r["streams"])
    return {"runs": runs, "max_realtime_streams": best, "first_failing_streams": fail}


# ---- 2 and 3: one stream ---------------------------------------------------------------------------------
def single_stream(tape: Tape, plan: Plan, threads: int) -> dict[str, Any]:
    ours = run_recognizer(tape, 1, warm_s=1.0, measure_s=plan.single_s, seed=2)
    base = run_baseline(tape, 1, warm_s=1.0, measure_s=plan.single_s, threads=threads, seed=2)
    return {
        "audio_s": ours.audio_s,
        "rnnstream": {
            "compute_s": ours.compute_s,
            "rtf": ours.rtf,
            "labels": ours.labels,
            "other_processes_cores": ours.other_cores,
        },
        "baseline": {"compute_s": base.compute_s, "rtf": base.rtf, "other_processes_cores": base.other_cores},
    }


def _percentiles(ms: np.ndarray) -> dict[str, float]:
    if not len(ms):
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "count": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


class FrameCounter:
    """Counts the feature frames the front end computes, by wrapping ``connectors.audio.mfcc_frames``
    (the one function every MFCC goes through) while in use; ``available`` is False where it is gone."""

    def __init__(self) -> None:
        import connectors.audio as audio

        self._module = audio
        self._original = getattr(audio, "mfcc_frames", None)
        self.available = callable(self._original)
        self.frames = 0

    def __enter__(self) -> FrameCounter:
        if self.available:
            original = self._original

            def counted(frames: np.ndarray, settings: Any) -> np.ndarray:
                out = original(frames, settings)
                self.frames += len(out)
                return out

            self._module.mfcc_frames = counted
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            self._module.mfcc_frames = self._original


def frame_latency(tape: Tape, seconds: float, warm_s: float = 1.0, seed: int = 3) -> dict[str, Any]:
    """One stream pushed one hop at a time, back to back.

    - ``compute``: each hop's push + tick time.
    - ``frame_out``: for each frame, from the push that brought its last sample to the tick that computed
      it, in stream time (the hops the front end held the frame back, e.g. in a resampler's buffer) plus
      that tick's compute time: how late the frame is out, beyond its hop, when samples arrive in real time.
    - ``label``: for each label, from the end of the recording it names to the tick that returned it, the
      same way (endpointing's hangover included).
    """
    from models import load_bundle
    from rnnstream.digits import ASSET

    m = load_bundle(ASSET).info.features["mfcc"]
    ratio = tape.rate / m["sample_rate"]
    offset = int(np.random.default_rng(seed).integers(0, len(tape.audio)))
    hop = round(HOP_S * tape.rate)
    warm, hops = round(warm_s / HOP_S), round(seconds / HOP_S)
    rec = new_recognizer()
    push = _pusher(rec, tape.rate)
    compute = np.zeros(hops)
    ends = np.zeros(hops, np.int64)
    frame_out: list[float] = []
    label: list[float] = []
    offsets = np.array([offset])
    meter = None
    counter = FrameCounter()
    try:
        with counter:
            for t in range(warm + hops):
                if t == warm:
                    meter = BackgroundCpu()
                (chunk,) = tape.chunks(offsets, t * hop, hop)
                before = counter.frames
                start = time.perf_counter()
                push(0, chunk)
                found = rec.tick()
                dt = time.perf_counter() - start
                if t < warm:
                    continue
                compute[t - warm] = dt
                ends[t - warm] = offset + (t + 1) * hop - 1
                now = (t + 1) * hop  # input samples the stream has received
                for k in range(before, counter.frames):
                    last = math.ceil((k * m["hop_length"] + m["n_fft"]) * ratio)  # input samples it needs
                    completed = math.ceil(last / hop) * hop  # the push that brought its last sample
                    frame_out.append((now - completed) / tape.rate * 1e3 + dt * 1e3)
                for r in found:
                    seg = _segment_at(tape, offset + round((r.start_s + r.end_s) / 2 * tape.rate))
                    if seg is not None:
                        label.append((now - (seg[1] - offset)) / tape.rate * 1e3 + dt * 1e3)
        other = meter.cores() if meter else 0.0
    finally:
        rec.close()
    ms = compute * 1e3
    speech = tape.digit_at(ends) >= 0
    return {
        "compute": _percentiles(ms),
        "compute_in_recordings": _percentiles(ms[speech]),
        "frame_out": _percentiles(np.asarray(frame_out)) if counter.available else None,
        "label": _percentiles(np.asarray(label)),
        "audio_s": hops * HOP_S,
        "other_processes_cores": other,
    }


def _segment_at(tape: Tape, pos: int) -> tuple[int, int] | None:
    """The (start, end) of the recording under tape position ``pos`` (mod the tape), in the same
    unwrapped coordinates as ``pos``; None in a gap."""
    p = pos % len(tape.audio)
    k = int(np.searchsorted(tape.segments[:, 0], p, side="right")) - 1
    if k < 0 or p >= tape.segments[k, 1]:
        return None
    base = pos - p
    return int(base + tape.segments[k, 0]), int(base + tape.segments[k, 1])


# ---- 4: memory -------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def malloc_trim() -> bool:
    """Hand the heap's free memory back to the system (glibc): what RSS is left is live or fragmented.
    The engine raises glibc's trim threshold to 256 MiB (``engine.runtime``), so a tick's freed temporaries
    otherwise stay in RSS."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return False
    return True


def memory(
    tape: Tape, streams: int, seconds: float, every_s: float, wall_s: float, seed: int = 4
) -> dict[str, Any]:
    """RSS every ``every_s`` of audio while ``streams`` streams run for ``seconds`` of audio (or until
    ``wall_s`` of wall time, whichever comes first)."""
    gc.collect()
    before = rss_bytes()
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, len(tape.audio), streams)
    size = round(CHUNK_S * tape.rate)
    ticks, every = round(seconds / CHUNK_S), max(1, round(every_s / CHUNK_S))
    rec = new_recognizer()
    push = _pusher(rec, tape.rate)
    empty = rss_bytes()
    samples: list[dict[str, float]] = []
    labels, done = 0, 0
    deadline = time.perf_counter() + wall_s
    try:
        for t in range(ticks):
            for sid, chunk in enumerate(tape.chunks(offsets, t * size, size)):
                push(sid, chunk)
            labels += len(rec.tick())
            done = t + 1
            if done % every == 0:
                samples.append({"audio_s": round(done * CHUNK_S, 3), "rss_bytes": rss_bytes()})
                if time.perf_counter() > deadline and len(samples) >= 3:
                    break
        trimmed = rss_bytes() if malloc_trim() else None
    finally:
        rec.close()
    start, middle, end = samples[0], samples[len(samples) // 2], samples[-1]
    growth = end["rss_bytes"] - middle["rss_bytes"]
    return {
        "streams": streams,
        "audio_s": done * CHUNK_S,
        "planned_audio_s": seconds,
        "labels": labels,
        "rss_before_bytes": before,
        "rss_recognizer_bytes": empty,
        "samples": samples,
        "rss_start_bytes": start["rss_bytes"],
        "rss_middle_bytes": middle["rss_bytes"],
        "rss_end_bytes": end["rss_bytes"],
        "bytes_per_stream": (start["rss_bytes"] - empty) / streams,
        "rss_end_trimmed_bytes": trimmed,
        "bytes_per_stream_trimmed": None if trimmed is None else (trimmed - empty) / streams,
        "growth_start_to_end_bytes": end["rss_bytes"] - start["rss_bytes"],
        "growth_middle_to_end_bytes": growth,
        "flat": growth <= max(2 << 20, 0.01 * end["rss_bytes"]),
    }


# ---- profile ---------------------------------------------------------------------------------------------
def profile(tape: Tape, streams: int, seconds: float = 3.0, top: int = 25) -> str:
    """cProfile of ``streams`` streams over ``seconds`` of audio (after 1 s of warm-up): the top functions
    by own time."""
    prof = cProfile.Profile()
    rng = np.random.default_rng(5)
    offsets = rng.integers(0, len(tape.audio), streams)
    size = round(CHUNK_S * tape.rate)
    rec = new_recognizer()
    push = _pusher(rec, tape.rate)
    warm, ticks = round(1.0 / CHUNK_S), round(seconds / CHUNK_S)
    try:
        for t in range(warm + ticks):
            chunks = tape.chunks(offsets, t * size, size)
            if t == warm:
                prof.enable()
            for sid, chunk in enumerate(chunks):
                push(sid, chunk)
            rec.tick()
        prof.disable()
    finally:
        rec.close()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# ---- all of it -------------------------------------------------------------------------------------------
def model_parameters() -> int:
    from models import load_bundle
    from rnnstream.digits import ASSET

    return int(sum(p.numel() for p in load_bundle(ASSET).parameters()))


def run_audio_benchmarks(
    quick: bool, progress: Progress, parts: Sequence[str] | None = None, baseline_threads: int | None = None
) -> dict[str, Any]:
    """The parts asked for (all by default); the baseline runs with ``baseline_threads`` torch threads
    (default: the same as the recognizer's engine)."""
    plan = QUICK if quick else FULL
    parts = parts or ("concurrent", "single", "latency", "memory", "baseline")
    rate = input_rate()
    if rate != RATE:
        progress(f"Recognizer.push takes no rate yet: streams are fed at {rate} Hz, not {RATE}")
    progress(f"building a {plan.tape_s:.0f} s tape from FSDD at {rate} Hz")
    tape = build_tape(plan.tape_s, rate)
    probe = new_recognizer()
    engine_threads = torch.get_num_threads()
    probe.close()
    baseline_threads = baseline_threads or engine_threads
    results: dict[str, Any] = {
        "machine": machine_info(torch.device("cpu")),
        "quick": quick,
        "config": {
            "input_rate": rate,
            "chunk_ms": CHUNK_S * 1e3,
            "hop_ms": HOP_S * 1e3,
            "tape_s": tape.seconds,
            "tape_recordings": len(tape.segments),
            "duty_cycle": tape.duty,
            "noise_dbfs": NOISE_DBFS,
            "warm_s": plan.warm_s,
            "measure_s": plan.measure_s,
            "torch_threads_rnnstream": engine_threads,
            "torch_threads_baseline": baseline_threads,
            "torch_threads_default": TORCH_DEFAULT_THREADS,
        },
        "model": {"parameters": model_parameters(), "bundle": "models/assets/digits_gru.safetensors"},
        "targets": TARGETS,
        "anchors": list(ANCHORS),
    }
    results["machine"]["torch_threads"] = engine_threads
    if "memory" in parts:  # first: the heap is not yet shaped by the other parts
        progress(f"memory: {plan.memory_streams:,} streams over {plan.memory_s:.0f} s of audio")
        results["memory"] = memory(
            tape, plan.memory_streams, plan.memory_s, plan.memory_every_s, plan.memory_wall_s
        )
    if "concurrent" in parts:
        progress("concurrent streams in real time")
        results["concurrent"] = search(
            lambda n: run_recognizer(tape, n, plan.warm_s, plan.measure_s),
            plan.start_streams,
            plan.max_streams,
            plan.bisect_steps,
            plan.measure_s,
            progress,
        )
    if "baseline" in parts:
        progress("baseline (librosa + nn.GRU per stream): concurrent streams in real time")
        results["baseline"] = search(
            lambda n: run_baseline(tape, n, max(1.0, plan.warm_s), plan.naive_measure_s, baseline_threads),
            plan.naive_start,
            plan.naive_max_streams,
            plan.bisect_steps,
            plan.naive_measure_s,
            progress,
        )
    if "single" in parts:
        progress("single stream")
        results["single"] = single_stream(tape, plan, baseline_threads)
    if "latency" in parts:
        progress("frame latency (10 ms hops)")
        results["latency"] = frame_latency(tape, plan.latency_s)
    return results


# ---- tables ----------------------------------------------------------------------------------------------
def _mark(ok: bool) -> str:
    return " ✓" if ok else " ✗"


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def render_tables(results: dict[str, Any]) -> list[Table]:
    tables = []
    cfg = results["config"]
    cores = results["machine"]["logical_cores"]
    kinds = [("rnnstream", "concurrent"), ("baseline", "baseline")]
    if any(k in results for _, k in kinds):
        t = Table(
            title=f"Concurrent {cfg['input_rate'] / 1e3:g} kHz streams on {cores} cores, "
            f"{cfg['chunk_ms']:.0f} ms chunks, recordings fill {cfg['duty_cycle']:.0%} of each stream"
        )
        for col in ("pipeline", "streams", "audio s", "compute s", "RTF", "tick p50 ms", "tick p99 ms"):
            t.add_column(col, justify="left" if col == "pipeline" else "right")
        t.add_column("tick max ms", justify="right")
        t.add_column("labels (right)", justify="right")
        t.add_column("other load", justify="right")
        t.add_column("real time", justify="center")
        for name, key in kinds:
            for r in results.get(key, {}).get("runs", []):
                right = f"{r['labels']:,} ({r['labels_correct'] / r['labels']:.0%})" if r["labels"] else "-"
                t.add_row(
                    name,
                    f"{r['streams']:,}",
                    f"{r['audio_s']:.1f}",
                    f"{r['compute_s']:.2f}",
                    f"{r['rtf']:.3f}",
                    f"{r['tick_p50_ms']:.1f}",
                    f"{r['tick_p99_ms']:.1f}",
                    f"{r['tick_max_ms']:.1f}",
                    right if key == "concurrent" else "-",
                    f"{r['other_processes_cores']:.2f}",
                    ("yes" if r["realtime"] else "no") + (" (stopped)" if r["stopped_early"] else ""),
                )
        tables.append(t)
    s = Table(title="Summary: rnnstream against the baseline in the same run")
    for col in ("figure", "rnnstream", "baseline", "rnnstream vs baseline", "target"):
        s.add_column(col, justify="left" if col == "figure" else "right")
    if "concurrent" in results:
        ours = results["concurrent"]["max_realtime_streams"]
        more = "" if results["concurrent"]["first_failing_streams"] else " (no failure found)"
        base = results.get("baseline", {}).get("max_realtime_streams")
        s.add_row(
            "max real-time streams",
            f"{ours:,}{_mark(ours >= TARGETS['streams_min'])}{more}",
            f"{base:,}" if base is not None else "-",
            f"{ours / base:.0f}×" if base else "-",
            f"≥ {TARGETS['streams_min']:,}",
        )
    if "single" in results:
        one = results["single"]
        ours, base = one["rnnstream"]["rtf"], one["baseline"]["rtf"]
        s.add_row(
            f"single-stream RTF ({one['audio_s']:.0f} s of audio)",
            f"{ours:.4f}{_mark(ours <= TARGETS['single_rtf_max'])}",
            f"{base:.4f}",
            f"{base / ours:.1f}× faster",
            f"≤ {TARGETS['single_rtf_max']}",
        )
    if "latency" in results:
        lat = results["latency"]
        rows = [("push + tick p99 ms, 10 ms hops", lat["compute"], "latency_p99_max_ms")]
        if lat.get("frame_out"):
            rows.append(("frame out beyond its hop p99 ms", lat["frame_out"], "latency_p99_max_ms"))
        rows.append(("label after the recording's end p99 ms", lat["label"], "label_p99_max_ms"))
        for name, r, target in rows:
            p99 = r["p99_ms"]
            if p99 is None:
                s.add_row(name, "- (none)", "-", "-", f"≤ {TARGETS[target]:g}")
                continue
            s.add_row(name, f"{p99:.3f}{_mark(p99 <= TARGETS[target])}", "-", "-", f"≤ {TARGETS[target]:g}")
    if "memory" in results:
        m = results["memory"]
        s.add_row(
            f"RSS per stream ({m['streams']:,} streams), growth",
            f"{m['bytes_per_stream'] / 1024:,.1f} KiB, {_mib(m['growth_middle_to_end_bytes'])} MiB"
            f"{_mark(m['flat'])}",
            "-",
            "-",
            "flat",
        )
    tables.append(s)
    if "latency" in results:
        lat = results["latency"]
        lt = Table(
            title=f"Latency: one stream pushed 10 ms at a time, {lat['audio_s']:.0f} s of audio, "
            f"other load {lat['other_processes_cores']:.2f} cores"
        )
        for col in ("what", "count", "p50 ms", "p99 ms", "max ms"):
            lt.add_column(col, justify="left" if col == "what" else "right")
        rows = [
            ("push + tick (compute), every hop", "compute"),
            ("push + tick (compute), hops inside a recording", "compute_in_recordings"),
            ("frame out beyond its hop (held back + compute)", "frame_out"),
            ("label after the recording's end", "label"),
        ]
        for name, key in rows:
            r = lat.get(key)
            if not r or not r["count"]:
                lt.add_row(name, "-", "-", "-", "-")
                continue
            lt.add_row(
                name, f"{r['count']:,}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['max_ms']:.3f}"
            )
        tables.append(lt)
    if "memory" in results:
        m = results["memory"]
        cut = (
            f", wall-time cap (planned {m['planned_audio_s']:.0f} s)"
            if m["audio_s"] < m["planned_audio_s"]
            else ""
        )
        mt = Table(title=f"Memory: {m['streams']:,} streams, {m['audio_s']:.0f} s of audio{cut}")
        for col in ("point", "audio s", "RSS MiB", "growth since start MiB"):
            mt.add_column(col, justify="left" if col == "point" else "right")
        mt.add_row("before the recognizer", "-", _mib(m["rss_before_bytes"]), "-")
        mt.add_row("recognizer, no stream", "-", _mib(m["rss_recognizer_bytes"]), "-")
        samples = m["samples"]
        first = samples[0]["rss_bytes"]
        for name, row in (
            ("start", samples[0]),
            ("middle", samples[len(samples) // 2]),
            ("end", samples[-1]),
        ):
            mt.add_row(name, f"{row['audio_s']:.1f}", _mib(row["rss_bytes"]), _mib(row["rss_bytes"] - first))
        if m.get("rss_end_trimmed_bytes") is not None:
            trimmed = m["rss_end_trimmed_bytes"]
            mt.add_row(
                f"end, after malloc_trim(0): {m['bytes_per_stream_trimmed'] / 1024:,.1f} KiB/stream",
                f"{samples[-1]['audio_s']:.1f}",
                _mib(trimmed),
                _mib(trimmed - first),
            )
        tables.append(mt)
    return tables


def notes(results: dict[str, Any]) -> list[str]:
    """The lines printed under the tables: anchors, parameters, threads, machine."""
    cfg, m = results["config"], results["machine"]
    lines = [f"Anchors (published, not measured here): {a}." for a in ANCHORS]
    lines.append(f"Ours: {results['model']['parameters']:,} parameters (GRU 20→128×2 + linear head).")
    if cfg["input_rate"] != RATE:
        lines.append(f"Streams fed at {cfg['input_rate']} Hz: Recognizer.push took no rate in this run.")
    lines.append(
        f"{m['cpu_model']}, {m['logical_cores']} cores, torch {m['torch']}; torch threads: "
        f"{cfg['torch_threads_rnnstream']} for rnnstream (the engine's default: cores - 1), "
        f"{cfg['torch_threads_baseline']} for the baseline (torch's own default: "
        f"{cfg['torch_threads_default']})"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test, ~30 s)")
    parser.add_argument(
        "--only", choices=("concurrent", "single", "latency", "memory", "baseline"), action="append"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument(
        "--baseline-threads",
        type=int,
        default=None,
        help="torch threads of the baseline (default: the recognizer's; see the module docstring)",
    )
    parser.add_argument("--profile", type=int, metavar="N", help="only profile a tick at N streams")
    args = parser.parse_args(argv)
    console = bench_console()
    progress = lambda m: console.print(f"[dim]… {m}[/]")  # noqa: E731
    if args.profile:
        tape = build_tape(30.0, input_rate())
        console.print(profile(tape, args.profile), markup=False, highlight=False)
        return 0
    started = time.perf_counter()
    results = run_audio_benchmarks(args.quick, progress, args.only, args.baseline_threads)
    results["elapsed_s"] = time.perf_counter() - started
    publish(console, render_tables(results), results, args.json)
    for line in notes(results):
        console.print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
