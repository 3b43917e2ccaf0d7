"""What a text stream costs per token: users' chat messages (JSON) through the tokenizer and the engine
to a label at each user's end marker, against what a user writes without rnnstream.

Workload: ``USERS`` users, each sending ``MESSAGES`` sentences of the shipped sentiment corpus
(``models/assets/sentiment_corpus``, ~15 tokens each), all users' messages interleaved at random (each
user's own in order), the last message of each user with ``"control": "end"``. The model: the shipped
example's shape, ``Embedding(V, 32) → GRU(32, 64) → Linear(64, 2) → softmax``, V the shipped tokenizer's
vocabulary (weights seeded at random: the cost does not depend on them).

- rnnstream: per poll of ``POLL`` messages, ``connectors.text.TextDecoder`` decodes each message into
  token ids, one ``Engine.step_many`` steps all of them, one ``Engine.end_many`` labels the users whose
  end marker came.
- baseline: per message, one user at a time: parse the JSON, tokenize, append the ids to the user's
  history and run the torch module over the whole history so far (its last output is the label so far).

Both give the same labels at the end markers (checked, 1e-5). Figures: µs per token
(``engine_us_per_event``: one event = one token). Run: ``python -m benchmarks.text_cost [--quick]``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch
from torch import nn

from connectors.base import Message
from connectors.text import TextDecoder, Tokenizer
from engine import Engine
from models import from_torch, load_bundle
from rnnstream.text import sentiment_corpus

ASSET = Path(__file__).resolve().parents[1] / "models" / "assets" / "sentiment_gru.safetensors"
USERS = 1000
MESSAGES = 4  # per user
POLL = 500  # messages per engine batch (a source poll)
BASELINE_USERS = 200  # users timed for the baseline in quick mode (its cost per token does not depend on it)


@dataclass
class Workload:
    """``messages``: ``(user, JSON payload)`` in arrival order; ``tokens``: their total token count."""

    messages: list[tuple[int, bytes]]
    tokens: int


def workload(tokenizer: Tokenizer, users: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    texts = [text for text, _ in sentiment_corpus()]
    sent = dict.fromkeys(range(users), 0)
    order = rng.permutation([u for u in range(users) for _ in range(MESSAGES)])
    messages, tokens = [], 0
    for u in order:
        text = texts[int(rng.integers(len(texts)))]
        sent[u] += 1
        doc = {"text": text, "user": f"user-{u}", **({"control": "end"} if sent[u] == MESSAGES else {})}
        messages.append((int(u), orjson.dumps(doc)))
        tokens += len(tokenizer.encode(text))
    return Workload(messages, tokens)


class TorchSentiment(nn.Module):
    """The module a user trains: ids ``(T,)`` → class probabilities ``(2,)`` after the last token."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 32)
        self.gru = nn.GRU(32, 64)
        self.linear = nn.Linear(64, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hs, _ = self.gru(self.embedding(ids)[:, None])  # (T, 1, 64)
        return torch.softmax(self.linear(hs[-1, 0]), -1)


def run_engine(engine: Engine, decoder: TextDecoder, load: Workload) -> dict[str, np.ndarray]:
    """The workload through decoder + engine; returns each user's label at its end marker."""
    labels: dict[str, np.ndarray] = {}
    for lo in range(0, len(load.messages), POLL):
        ids: list[str] = []
        xs: list[int] = []
        ends: list[str] = []
        for _u, payload in load.messages[lo : lo + POLL]:
            decoded = decoder.decode(Message(payload))
            ids += [decoded.stream_id] * len(decoded.xs)
            xs += decoded.xs
            if decoded.control == "end":
                ends.append(decoded.stream_id)
        engine.step_many(ids, np.array(xs, np.int64))
        labels.update(zip(ends, engine.end_many(ends), strict=True))
    return labels


@torch.no_grad()
def run_baseline(module: TorchSentiment, tokenizer: Tokenizer, load: Workload) -> dict[str, np.ndarray]:
    """Per message: parse, tokenize, re-run the module over the user's whole history."""
    history: dict[str, list[int]] = {}
    labels: dict[str, np.ndarray] = {}
    for _u, payload in load.messages:
        doc = orjson.loads(payload)
        user = doc["user"]
        ids = history.setdefault(user, [])
        ids += tokenizer.encode(doc["text"])
        y = module(torch.tensor(ids))
        if doc.get("control") == "end":
            labels[user] = y.numpy()
            del history[user]
    return labels


def _best_seconds(run, rounds: int) -> tuple[float, dict[str, np.ndarray]]:
    best, out = float("inf"), {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t0)
    return best, out


def rows(quick: bool) -> list[dict[str, object]]:
    """One row: µs per token through tokenizer + engine vs the per-message torch re-run, one thread."""
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_features(load_bundle(ASSET).info.features)
    torch.manual_seed(0)
    module = TorchSentiment(tokenizer.size).eval()
    model = from_torch(module.gru, module.linear, head_kind="classifier", embedding=module.embedding)
    decoder = TextDecoder(tokenizer)
    load = workload(tokenizer, USERS)
    rounds = 1 if quick else 3
    with Engine(model, device="cpu", capacity=USERS, num_threads=1) as engine:
        run_engine(engine, decoder, workload(tokenizer, 50, seed=1))  # warm-up
        engine_s, engine_labels = _best_seconds(lambda: run_engine(engine, decoder, load), rounds)
    base_load = workload(tokenizer, BASELINE_USERS) if quick else load
    base_s, base_labels = _best_seconds(lambda: run_baseline(module, tokenizer, base_load), rounds)
    if base_load is load:  # the same labels both ways
        for user, y in base_labels.items():
            np.testing.assert_allclose(engine_labels[user], y, atol=1e-5, rtol=1e-5)
    engine_us, base_us = 1e6 * engine_s / load.tokens, 1e6 * base_s / base_load.tokens
    return [
        {
            "architecture": "text stream (tokenizer + embedding → GRU, label at end marker)",
            "setting": f"Emb-32 → GRU-64, V={tokenizer.size}, {USERS} users × {MESSAGES} messages "
            f"(~{load.tokens / len(load.messages):.0f} tokens each), µs per token",
            "engine_us_per_event": engine_us,
            "baseline": "per message: parse, tokenize, torch module re-run over the user's whole history",
            "baseline_us_per_event": base_us,
            "speedup": base_us / engine_us,
        }
    ]


if __name__ == "__main__":  # one table with the machine named: the architectures benchmark, this row alone
    from benchmarks.architectures_bench import main

    sys.exit(main(["--only", "text_cost", *sys.argv[1:]]))
