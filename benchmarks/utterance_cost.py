"""What utterance mode costs (``models.utterance``): a bidirectional classifier over whole utterances of
``STREAMS`` streams that end together, against what a user writes without rnnstream.

- rnnstream: each of ``FRAMES`` rounds is one ``Engine.step_many`` of every stream's next frame (buffered
  in its state), then one ``Engine.end_many`` of all the streams: the whole model once, batched over the
  utterances (``pack_padded_sequence``). A second row ends them one ``Engine.end`` call at a time (what a
  pipeline gets when ends arrive alone): the cost of not batching the ends.
- baseline: a dict of per-stream Python lists, one ``append`` per frame; at each end, the frames stacked and
  the torch module (``nn.GRU/LSTM(bidirectional=True)`` and its ``nn.Linear`` on ``h_n[-2] ‖ h_n[-1]``)
  run on that utterance alone, one stream at a time.

µs per event = per frame (the total over ``STREAMS * FRAMES`` frames); per utterance = ``FRAMES`` times
that. Run: ``python -m benchmarks.utterance_cost`` (one torch thread), or through
``benchmarks.architectures_bench``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from engine import Engine
from models import from_torch

STREAMS = 1000
FRAMES = 100
FEATURES = 13  # an MFCC frame, as the digit recognizer's
HIDDEN = 64
CLASSES = 10
BASELINE = "per-stream frame lists + the torch module once per utterance, one stream at a time"
MODULES: dict[str, type[nn.RNNBase]] = {"gru": nn.GRU, "lstm": nn.LSTM}


def _classifier(cell: str, seed: int = 0) -> tuple[nn.RNNBase, nn.Linear]:
    torch.manual_seed(seed)
    rnn = MODULES[cell](FEATURES, HIDDEN, bidirectional=True).eval()
    return rnn, nn.Linear(2 * HIDDEN, CLASSES).eval()


def _engine_run(engine: Engine, utterances: np.ndarray, batched_end: bool) -> np.ndarray:
    """Every stream's frames, one ``step_many`` per round, then their ends; returns ``(STREAMS, CLASSES)``."""
    streams = len(utterances)
    ids = np.arange(streams, dtype=np.int64)
    for t in range(utterances.shape[1]):
        engine.step_many(ids, utterances[:, t])
    if batched_end:
        return np.stack(engine.end_many(ids.tolist()))  # type: ignore[arg-type]  # no refusals here
    return np.stack([engine.end(sid) for sid in ids.tolist()])


def _baseline_run(rnn: nn.RNNBase, head: nn.Linear, utterances: np.ndarray) -> np.ndarray:
    """Per-stream lists of frames, then the torch module once per utterance, one stream at a time."""
    streams = len(utterances)
    buffers: dict[int, list[np.ndarray]] = {sid: [] for sid in range(streams)}
    for t in range(utterances.shape[1]):
        frames = utterances[:, t]
        for sid in range(streams):
            buffers[sid].append(frames[sid])
    out = []
    with torch.no_grad():
        for sid in range(streams):
            x = torch.from_numpy(np.stack(buffers.pop(sid))).unsqueeze(1)  # (T, 1, F)
            _, final = rnn(x)
            h_n = final[0] if isinstance(final, tuple) else final
            out.append(head(torch.cat([h_n[-2], h_n[-1]], dim=1))[0].numpy())
    return np.stack(out)


def _best_seconds(run: Callable[[], np.ndarray], rounds: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), np.empty(0)
    for _ in range(rounds):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def measure(cell: str, streams: int, rounds: int) -> list[dict[str, Any]]:
    """Rows for one cell: batched ends and ends one at a time, each against the baseline."""
    rnn, head = _classifier(cell)
    model = from_torch(rnn, head, utterance_frames=FRAMES)
    utterances = np.random.default_rng(0).standard_normal((streams, FRAMES, FEATURES), dtype=np.float32)
    base_s, expected = _best_seconds(lambda: _baseline_run(rnn, head, utterances), rounds)
    rows = []
    with Engine(model, device="cpu", capacity=streams, num_threads=1, max_batch=streams) as engine:
        for batched_end in (True, False):
            seconds, got = _best_seconds(lambda b=batched_end: _engine_run(engine, utterances, b), rounds)
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)  # the same answers
            frames = streams * FRAMES
            how = "ends batched (end_many)" if batched_end else "ends one at a time (end)"
            rows.append(
                {
                    "architecture": "utterance (bidirectional)",
                    "setting": f"bi-{cell.upper()}-{HIDDEN}, {streams} streams x {FRAMES} frames, {how}",
                    "engine_us_per_event": seconds / frames * 1e6,
                    "baseline": BASELINE,
                    "baseline_us_per_event": base_s / frames * 1e6,
                    "speedup": base_s / seconds,
                    "engine_us_per_utterance": seconds / streams * 1e6,
                    "baseline_us_per_utterance": base_s / streams * 1e6,
                }
            )
    return rows


def rows(quick: bool) -> list[dict[str, Any]]:
    """The cost rows (``benchmarks.architectures_bench``); ``quick``: one cell, one round (< 20 s)."""
    torch.set_num_threads(1)
    cells = ("gru",) if quick else ("gru", "lstm")
    return [row for cell in cells for row in measure(cell, STREAMS, 1 if quick else 3)]


if __name__ == "__main__":  # one table with the machine named: the architectures benchmark, this row alone
    from benchmarks.architectures_bench import main

    sys.exit(main(["--only", "utterance_cost", *sys.argv[1:]]))
