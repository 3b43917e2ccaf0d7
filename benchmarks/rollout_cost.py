"""What one-to-many outputs cost per stream and output step: forecast rollouts (``Engine.forecast_many``)
and encoder-decoder decoding (``Engine.decode_many``), against what a user writes without rnnstream.

- rnnstream: ``forecast_many`` (``decode_many``) over ``STREAMS`` streams at once, each with its own
  state (restored from a snapshot of random states): one batched step per horizon step.
- baseline: per stream, the torch loop a user writes: a dict of per-stream states, and for each stream
  one ``nn.LSTMCell`` (``nn.GRUCell``) step + ``nn.Linear`` head per horizon step, feeding the output
  back (the decoder: its bridge first), one stream at a time.

Figures: µs per stream per output step (``engine_us_per_event``: one event = one stream's one step).
Run: ``python -m benchmarks.architectures_bench --only rollout_cost`` (one torch thread).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.engine_bench import _best_rates
from engine import Engine
from engine.snapshot import EngineSnapshot, state_layout
from models import StreamModel, from_torch
from models.decoder import seq2seq_from_torch

STREAMS = 1000
FEATURES = 16
HIDDEN = 64
HORIZON = 24
BASELINE_STREAMS = 50  # streams per timed baseline block (its cost per stream does not depend on the count)


def _with_random_states(engine: Engine, rng: np.random.Generator) -> list[int]:
    """Give ``STREAMS`` streams random states (as after some history each); returns their ids."""
    model = engine.model
    states = [
        torch.from_numpy(rng.standard_normal((STREAMS, w), dtype=np.float32)) * 0.3
        for w in model.state_widths()
    ]
    ids = list(range(STREAMS))
    engine.restore(EngineSnapshot(ids, states, layout=state_layout(model)))
    return ids


def _engine_block(call: Callable[[list[int], int], Any], ids: list[int]) -> Callable[[int], int]:
    def block(_i: int) -> int:
        call(ids, HORIZON)
        return len(ids) * HORIZON

    return block


def _cell_of(module: nn.LSTM | nn.GRU) -> nn.LSTMCell | nn.GRUCell:
    """The ``nn.*Cell`` with the one-layer module's weights."""
    cell = (nn.LSTMCell if isinstance(module, nn.LSTM) else nn.GRUCell)(module.input_size, module.hidden_size)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(module, f"{name}_l0"))
    return cell.eval()


def _baseline_block(
    step: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]], first: Callable[[Any], Any], states: dict
) -> Callable[[int], int]:
    """Per stream, one at a time: ``first(state)`` → (output, state), then ``HORIZON - 1`` × ``step``."""

    def block(i: int) -> int:
        lo = (i * BASELINE_STREAMS) % STREAMS
        with torch.no_grad():
            for sid in range(lo, lo + BASELINE_STREAMS):
                y, state = first(states[sid])
                for _ in range(HORIZON - 1):
                    y, state = step(y, state)
        return BASELINE_STREAMS * HORIZON

    return block


def _rates(engine_block: Callable[[int], int], baseline: Callable[[int], int], quick: bool) -> dict:
    seconds, rounds = (0.3, 1) if quick else (1.5, 3)
    blocks = {"engine": engine_block, "baseline": baseline}
    for block in blocks.values():
        block(0)
    return {k: 1e6 / v for k, v in _best_rates(blocks, dict.fromkeys(blocks, seconds), rounds).items()}


def forecast_row(quick: bool) -> dict[str, object]:
    torch.manual_seed(0)
    lstm, head = nn.LSTM(FEATURES, HIDDEN).eval(), nn.Linear(HIDDEN, FEATURES).eval()
    model: StreamModel = from_torch(lstm, head)
    rng = np.random.default_rng(0)
    with Engine(model, device="cpu", capacity=STREAMS, num_threads=1) as engine:
        ids = _with_random_states(engine, rng)
        states = {sid: engine.state_of(sid) for sid in range(STREAMS)}
        states = {sid: (h[None], c[None]) for sid, (h, c) in states.items()}
        cell = _cell_of(lstm)

        def step(y: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
            h, c = cell(y, state)
            return head(h), (h, c)

        us = _rates(
            _engine_block(engine.forecast_many, ids),
            _baseline_block(step, lambda s: (head(s[0]), s), states),
            quick,
        )
    return _row("forecast rollout", f"LSTM-{HIDDEN}, {FEATURES} features, horizon {HORIZON}", us)


def decode_row(quick: bool) -> dict[str, object]:
    torch.manual_seed(1)
    encoder, decoder = nn.LSTM(FEATURES, HIDDEN).eval(), nn.GRU(FEATURES, HIDDEN).eval()
    head, bridge = nn.Linear(HIDDEN, FEATURES).eval(), nn.Linear(HIDDEN, HIDDEN).eval()
    model = seq2seq_from_torch(
        encoder, decoder, head, bridge=bridge, bridge_activation="tanh", max_len=HORIZON
    )
    rng = np.random.default_rng(1)
    with Engine(model, device="cpu", capacity=STREAMS, num_threads=1) as engine:
        ids = _with_random_states(engine, rng)
        states = {sid: engine.state_of(sid)[0][None] for sid in range(STREAMS)}  # the encoder's top h
        cell = _cell_of(decoder)
        start = torch.zeros(1, FEATURES)

        def step(y: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = cell(y, h)
            return head(h), h

        us = _rates(
            _engine_block(engine.decode_many, ids),
            _baseline_block(step, lambda h_enc: step(start, torch.tanh(bridge(h_enc))), states),
            quick,
        )
    return _row("encoder-decoder decode", f"LSTM-{HIDDEN} → GRU-{HIDDEN} + bridge, {HORIZON} steps", us)


def _row(architecture: str, setting: str, us: dict[str, float]) -> dict[str, object]:
    return {
        "architecture": architecture,
        "setting": f"{setting}, {STREAMS} streams (µs per stream per step)",
        "engine_us_per_event": us["engine"],
        "baseline": "per stream: a torch loop of cell + head over the horizon, one stream at a time",
        "baseline_us_per_event": us["baseline"],
        "speedup": us["baseline"] / us["engine"],
    }


def rows(quick: bool) -> list[dict[str, object]]:
    """One forecast row and one decode row, one torch thread."""
    torch.set_num_threads(1)
    return [forecast_row(quick), decode_row(quick)]


if __name__ == "__main__":  # one table with the machine named: the architectures benchmark, this row alone
    from benchmarks.architectures_bench import main

    sys.exit(main(["--only", "rollout_cost", *sys.argv[1:]]))
