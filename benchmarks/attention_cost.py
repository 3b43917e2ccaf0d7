"""What attention over the last K states costs per event (``models.attention``), against the plain stack
and against what a user writes without rnnstream.

- rnnstream: ``Engine.step_many`` over batches of events of ``STREAMS`` interleaved streams (ids uniform),
  every ring full (steady state: restored from a snapshot of random states, as after K events each).
- plain: the same recurrent module and a head on ``h_t`` alone, the same events (the ring's extra cost).
- baseline: a dict of per-stream states and a ``deque(maxlen=K)`` of each stream's past ``h``; per event,
  one ``nn.GRUCell``/``nn.LSTMCell`` call, the reference's attention over the deque and the head
  (``AttentiveRecurrent``'s math, one stream at a time).

Run: ``python -m benchmarks.architectures_bench --only attention_cost`` (one torch thread).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.engine_bench import _best_rates
from engine import Engine
from engine.snapshot import EngineSnapshot, state_layout
from models import StreamModel, from_torch
from models.attention import AttentiveRecurrent

STREAMS = 2000
INPUT_SIZE = 16
HIDDEN = 64
OUT = 4
KIND = "general"  # Luong general: h_t^T W_a h_s
BATCH = 2000  # events per step_many call
CELLS: dict[str, tuple[type[nn.RNNBase], type[nn.RNNCellBase]]] = {
    "gru": (nn.GRU, nn.GRUCell),
    "lstm": (nn.LSTM, nn.LSTMCell),
}


def _reference(cell: str, window: int, seed: int = 0) -> AttentiveRecurrent:
    torch.manual_seed(seed)
    return AttentiveRecurrent(CELLS[cell][0](INPUT_SIZE, HIDDEN), KIND, window, OUT).eval()


def _full_rings(model: StreamModel, rng: np.random.Generator) -> EngineSnapshot:
    """Every stream with random layer states and a full ring (``attention_fill = [0, K]``)."""
    states = [
        torch.from_numpy(rng.standard_normal((STREAMS, w), dtype=np.float32)) * 0.3
        for w in model.state_widths()
    ]
    if model.attention is not None:
        states[-1] = torch.tensor([[0.0, float(model.attention.window)]]).repeat(STREAMS, 1)
    return EngineSnapshot(list(range(STREAMS)), states, layout=state_layout(model))


def _engine_block(engine: Engine, chunks: list[tuple[np.ndarray, np.ndarray]]) -> Callable[[int], int]:
    def block(i: int) -> int:
        ids, xs = chunks[i % len(chunks)]
        engine.step_many(ids, xs)
        return len(ids)

    return block


def deque_attention_event(
    ref: AttentiveRecurrent, single: nn.RNNCellBase, x: Tensor, state: Any, past: deque[Tensor]
) -> tuple[Tensor, Any]:
    """The baseline's work for one event of one stream: the cell on ``x (1, I)`` from ``state``, append
    ``h`` to the stream's ``past`` (``deque(maxlen=K)``), Luong-general attention over it, the head.
    Returns ``(output (1, out), new state)``."""
    state = single(x, state)
    h = state[0] if isinstance(state, tuple) else state
    past.append(h)
    keys = torch.cat(list(past))  # (k, H)
    weights = torch.softmax(keys @ (h @ ref.attention.weight).T, dim=0)  # (k, 1)
    return ref.head(torch.cat([h, weights.T @ keys], dim=1)), state


def single_cell(ref: AttentiveRecurrent, cell: str) -> nn.RNNCellBase:
    """The ``nn.GRUCell``/``nn.LSTMCell`` with the weights of ``ref``'s one-layer rnn."""
    single = CELLS[cell][1](INPUT_SIZE, HIDDEN).eval()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(single, name).copy_(getattr(ref.rnn, f"{name}_l0"))
    return single


def _baseline_block(
    ref: AttentiveRecurrent, cell: str, ids: np.ndarray, xs: np.ndarray, size: int = 64
) -> Callable[[int], int]:
    """``deque_attention_event`` per event, every stream's deque full at the start (steady state)."""
    single = single_cell(ref, cell)
    rng = np.random.default_rng(1)
    start = [
        torch.from_numpy(rng.standard_normal((1, HIDDEN), dtype=np.float32))
        for _ in range(ref.attention.window)
    ]
    states: dict[int, Any] = {}
    pasts: dict[int, deque[Tensor]] = {}
    for sid in range(STREAMS):
        states[sid] = (start[0], start[0].clone()) if cell == "lstm" else start[0]
        pasts[sid] = deque(start, maxlen=ref.attention.window)
    rows = [torch.from_numpy(x[None]) for x in xs]

    def block(i: int) -> int:
        lo = (i * size) % len(ids)
        with torch.no_grad():
            for sid, x in zip(ids[lo : lo + size].tolist(), rows[lo : lo + size], strict=True):
                _, states[sid] = deque_attention_event(ref, single, x, states[sid], pasts[sid])
        return min(size, len(ids) - lo)

    return block


def measure(cell: str, window: int, seconds: float, rounds: int) -> dict[str, Any]:
    """One row: rnnstream with attention, the plain stack, and the baseline, µs per event."""
    ref = _reference(cell, window)
    attentive = from_torch(ref)
    plain = from_torch(ref.rnn, nn.Linear(HIDDEN, OUT))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, STREAMS, size=8 * BATCH, dtype=np.int64)
    xs = rng.standard_normal((len(ids), INPUT_SIZE), dtype=np.float32)
    chunks = [(ids[i : i + BATCH], xs[i : i + BATCH]) for i in range(0, len(ids), BATCH)]
    engines = {
        name: Engine(model, device="cpu", capacity=STREAMS, num_threads=1, max_batch=BATCH)
        for name, model in (("attention", attentive), ("plain", plain))
    }
    try:
        blocks: dict[str, Callable[[int], int]] = {}
        for name, engine in engines.items():
            engine.restore(_full_rings(engine.model, rng))
            blocks[name] = _engine_block(engine, chunks)
            blocks[name](0)
        blocks["baseline"] = _baseline_block(ref, cell, ids, xs)
        rates = _best_rates(blocks, dict.fromkeys(blocks, seconds), rounds)
    finally:
        for engine in engines.values():
            engine.close()
    us = {name: 1e6 / rate for name, rate in rates.items()}
    return {
        "architecture": "attention over past states",
        "setting": f"{cell.upper()}-{HIDDEN}, {KIND}, K={window}, {STREAMS} streams",
        "engine_us_per_event": us["attention"],
        "plain_us_per_event": us["plain"],
        "baseline": "per-stream deque of states + the reference attention, one event at a time",
        "baseline_us_per_event": us["baseline"],
        "speedup": us["baseline"] / us["attention"],
    }


def rows(quick: bool) -> list[dict[str, object]]:
    """Cost per event against K, GRU-64 and LSTM-64 (quick: GRU-64 at K = 8 and 128, short timings)."""
    torch.set_num_threads(1)
    if quick:
        return [measure("gru", k, seconds=0.4, rounds=1) for k in (8, 128)]
    return [measure(cell, k, seconds=1.5, rounds=3) for cell in CELLS for k in (1, 8, 32, 128)]


if __name__ == "__main__":  # one table with the machine named: the architectures benchmark, this row alone
    from benchmarks.architectures_bench import main

    sys.exit(main(["--only", "attention_cost", *sys.argv[1:]]))
