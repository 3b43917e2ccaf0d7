"""Where an engine event's time goes at hidden 64: the engine against the floors under it, in one run.

Run ``python -m benchmarks.engine_floor [--threads N] [--json PATH]``.

For each cell (RNN tanh, GRU, LSTM), hidden 64, input 16 and 32, 10,000 streams, chunks of 4,096 random
events (the engine benchmark's workload), in events/s:

- ``naive``: the engine benchmark's naive loop (a dict of states, one ``nn.*Cell`` call per event);
- ``engine``: ``Engine.step_many`` over the chunks;
- ``kernels``: the model's step alone on the same waves (``StreamModel.step`` on rows gathered in
  advance: no id map, no wave planning, no gather or scatter);
- ``gemms``: only the step's matrix products (``x W_ihᵀ`` and ``h W_hhᵀ`` for every wave), the floor of any
  implementation that computes the same equations in float32 on this machine.

``engine/naive`` is the engine benchmark's ratio; ``gemms/naive`` is the most any float32 implementation
could reach here, so a target above it cannot be met on this machine with these thread counts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import engine_bench as eb
from benchmarks.report import bench_console
from engine.engine import Engine
from models.convert import from_torch

CELLS = ("rnn_tanh", "gru", "lstm")
HIDDEN = 64
DEFAULT_JSON = Path("results/engine_floor.json")


def _wave_sizes(engine: Engine, chunks: list[tuple[np.ndarray, np.ndarray]]) -> list[list[int]]:
    """The wave sizes the engine runs for each chunk."""
    return [[len(w) for w in engine._store.waves(engine._store.slots_for(ids))] for ids, _ in chunks]


def kernels_block(engine: Engine, waves: list[list[int]], input_size: int) -> Callable[[int], int]:
    """``StreamModel.step`` on the chunk's waves, inputs and states made in advance."""
    model = engine.model
    made = [
        [(torch.randn(n, input_size), [torch.randn(n, w) for w in model.state_widths()]) for n in sizes]
        for sizes in waves
    ]

    def block(i: int) -> int:
        with torch.no_grad():
            for x, state in made[i % len(made)]:
                model.step(x, state)
        return sum(len(x) for x, _ in made[i % len(made)])

    return block


def gemms_block(engine: Engine, waves: list[list[int]], input_size: int) -> Callable[[int], int]:
    """The step's two matrix products for each wave, nothing else."""
    layer = engine.model.layers[0]
    w_ih, w_hh = layer.weight_ih.detach().t(), layer.weight_hh.detach().t()
    made = [[(torch.randn(n, input_size), torch.randn(n, HIDDEN)) for n in sizes] for sizes in waves]

    def block(i: int) -> int:
        for x, h in made[i % len(made)]:
            torch.mm(x, w_ih)
            torch.mm(h, w_hh)
        return sum(len(x) for x, _ in made[i % len(made)])

    return block


def floor_row(cell: str, input_size: int, threads: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Events/s of naive, engine, kernels and gemms for one cell, measured in interleaved rounds."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    seq, single = eb.build_modules(cell, HIDDEN, torch.device("cpu"), input_size)
    chunks = [eb.make_events(rng, eb.CHUNK, input_size) for _ in range(16)]
    base_ids, base_xs = eb.make_events(rng, 16_384, input_size)
    with Engine(from_torch(seq), device="cpu", capacity=eb.NUM_STREAMS, num_threads=threads) as engine:
        eb._warm_engine(engine, chunks)
        waves = _wave_sizes(engine, chunks)
        blocks = {
            "naive": eb.naive_block(
                single, base_ids.tolist(), list(torch.from_numpy(base_xs)), torch.device("cpu")
            ),
            "engine": eb.engine_block(engine, chunks),
            "kernels": kernels_block(engine, waves, input_size),
            "gemms": gemms_block(engine, waves, input_size),
        }
        for block in blocks.values():
            block(0)
        rates = eb._best_rates(blocks, dict.fromkeys(blocks, 0.4), rounds)
    return {
        "cell": cell,
        "input": input_size,
        "threads": threads,
        **{f"{k}_eps": v for k, v in rates.items()},
    }


def render(rows: Sequence[dict[str, Any]], machine: str) -> None:
    console = bench_console()
    table = eb._table(f"Where an event's time goes, hidden {HIDDEN} — {machine}", [
        "cell", "input", "threads", "naive", "engine", "kernels", "gemms",
        "engine/naive", "kernels/naive", "gemms/naive", "engine/kernels",
    ])  # fmt: skip
    for r in rows:
        n = r["naive_eps"]
        table.add_row(
            r["cell"], str(r["input"]), str(r["threads"]),
            *(eb._eps(r[f"{k}_eps"]) for k in ("naive", "engine", "kernels", "gemms")),
            f"{r['engine_eps'] / n:.1f}×", f"{r['kernels_eps'] / n:.1f}×", f"{r['gemms_eps'] / n:.1f}×",
            f"{100 * r['engine_eps'] / r['kernels_eps']:.0f}%",
        )  # fmt: skip
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts to run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    info = eb.machine_info(torch.device("cpu"))
    rows = [
        floor_row(cell, size, threads, args.rounds)
        for threads in args.threads
        for size in (16, 32)
        for cell in CELLS
    ]
    machine = f"{info['cpu_model']}, {info['logical_cores']} cores, torch {info['torch']}, CPU"
    render(rows, machine)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
