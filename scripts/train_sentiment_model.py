"""Train the text-sentiment example: ``models/assets/sentiment_gru.safetensors``.

``nn.Embedding(V, 32)`` → ``nn.GRU(32, 64)`` → ``nn.Linear(64, 2)`` reads one token id per event and,
at a message stream's end marker, gives ``softmax`` over (negative, positive) from the last hidden state
(many-to-one). Corpus: the 3,000 labelled sentences of ``models/assets/sentiment_corpus`` (Amazon, IMDb,
Yelp; see its ``SOURCE.md``), split once by ``--seed`` into train (70 %), validation (15 %, early
stopping) and test (15 %, held out: read once, after training, never tuned on). The vocabulary
(``connectors.text.Tokenizer.fit``: tokens seen at least twice in train) ships in the bundle as
``ModelInfo.features["tokenizer"]``; the class names as ``features["classes"]``.

Baselines on the same test split: the majority class of train, and a lexicon (each train token's
naive-Bayes log-count ratio, summed over a sentence's tokens; positive when > 0).

Deterministic for a given ``--seed``; well under a minute on 2 CPU cores.

    python scripts/train_sentiment_model.py [--seed 0] [--out models/assets/sentiment_gru.safetensors]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.text import Tokenizer
from models import ModelInfo, from_torch, save_bundle
from rnnstream.text import sentiment_corpus

ASSETS = Path(__file__).resolve().parents[1] / "models" / "assets"
DEFAULT_OUT = ASSETS / "sentiment_gru.safetensors"
DEFAULT_SAMPLE = Path(__file__).resolve().parents[1] / "configs" / "data" / "chat.csv"
CLASSES = ["negative", "positive"]


@dataclass
class TrainConfig:
    seed: int = 0
    embedding: int = 32
    hidden: int = 64
    min_count: int = 2
    dropout: float = 0.3
    epochs: int = 30
    patience: int = 6
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-5
    threads: int = 2


class SentimentGRU(nn.Module):
    """Token ids ``(T, B)`` → class logits ``(B, 2)`` at each sequence's last real token."""

    def __init__(self, vocabulary: int, config: TrainConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, config.embedding)
        self.dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.embedding, config.hidden)
        self.linear = nn.Linear(config.hidden, len(CLASSES))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``ids (T, B)`` padded after each sequence's ``lengths (B,)`` tokens (a GRU is causal: the
        padding after a sequence never reaches its last real output)."""
        hs, _ = self.gru(self.dropout(self.embedding(ids)))  # (T, B, H)
        last = hs[lengths - 1, torch.arange(ids.shape[1])]  # (B, H)
        return self.linear(self.dropout(last))


def split(items: list, seed: int) -> tuple[list, list, list]:
    """70 / 15 / 15 % train / validation / test, shuffled once by ``seed``."""
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    a, b = int(0.7 * len(items)), int(0.85 * len(items))
    return shuffled[:a], shuffled[a:b], shuffled[b:]


def batch_of(tok: Tokenizer, items: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids (T, B) int64 padded with the unknown id, lengths (B,), labels (B,))``."""
    seqs = [tok.encode(text) or [tok.unknown_id] for text, _ in items]
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((int(lengths.max()), len(seqs)), tok.unknown_id, dtype=torch.int64)
    for b, s in enumerate(seqs):
        ids[: len(s), b] = torch.tensor(s)
    return ids, lengths, torch.tensor([label for _, label in items])


@torch.no_grad()
def accuracy(net: SentimentGRU, tok: Tokenizer, items: list[tuple[str, int]]) -> float:
    net.eval()
    ids, lengths, labels = batch_of(tok, items)
    return float((net(ids, lengths).argmax(1) == labels).float().mean())


def train(config: TrainConfig, tok: Tokenizer, train_set: list, val_set: list) -> tuple[SentimentGRU, list]:
    """Adam on cross-entropy; keeps the weights of the best validation epoch (early stopping)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = SentimentGRU(tok.size, config)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_state, since_best, log = -1.0, None, 0, []
    for epoch in range(1, config.epochs + 1):
        t0, losses = time.monotonic(), []
        net.train()
        order = rng.permutation(len(train_set))
        for start in range(0, len(order), config.batch):
            ids, lengths, labels = batch_of(tok, [train_set[i] for i in order[start : start + config.batch]])
            loss = nn.functional.cross_entropy(net(ids, lengths), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        val = accuracy(net, tok, val_set)
        log.append(
            {"epoch": epoch, "loss": round(float(np.mean(losses)), 5), "validation_accuracy": round(val, 4)}
        )
        log[-1]["seconds"] = round(time.monotonic() - t0, 2)
        print(json.dumps(log[-1]), flush=True)
        if val > best:
            best, since_best = val, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    assert best_state is not None
    net.load_state_dict(best_state)
    return net.eval(), log


def lexicon_accuracy(tok: Tokenizer, train_set: list, test_set: list) -> float:
    """A learned lexicon: token weight ``log((n_pos(t) + 1) / N_pos) - log((n_neg(t) + 1) / N_neg)``
    over train (naive-Bayes log-count ratio), a sentence positive when its tokens' weights sum > 0
    (ties: the train majority)."""
    counts = [Counter(), Counter()]
    for text, label in train_set:
        counts[label].update(set(tok.tokens(text)))
    totals = [sum(c.values()) + len(tok.vocabulary) for c in counts]
    weight = {
        t: math.log((counts[1][t] + 1) / totals[1]) - math.log((counts[0][t] + 1) / totals[0])
        for t in tok.vocabulary
    }
    majority = majority_class(train_set)
    right = 0
    for text, label in test_set:
        score = sum(weight.get(t, 0.0) for t in tok.tokens(text))
        right += (int(score > 0) if score != 0 else majority) == label
    return right / len(test_set)


def majority_class(items: list[tuple[str, int]]) -> int:
    return Counter(label for _, label in items).most_common(1)[0][0]


def write_sample(test_set: list[tuple[str, int]], path: Path, users: int, seed: int) -> None:
    """A chat log for ``configs/text-sentiment.yaml`` from held-out sentences: ``users`` users, each
    sending 1 to 3 sentences of one polarity, the last with ``control=end``; rows interleaved in time.
    Column ``truth`` is the sentences' class (the service ignores it)."""
    rng = np.random.default_rng(seed)
    by_class = {c: [t for t, label in test_set if label == c] for c in (0, 1)}
    rows = []
    for u in range(users):
        truth = int(rng.integers(2))
        texts = [by_class[truth].pop() for _ in range(int(rng.integers(1, 4)))]
        start = int(rng.integers(0, 60))
        for k, text in enumerate(texts):
            end = "end" if k == len(texts) - 1 else ""
            rows.append((1_700_000_000 + start + 7 * k, f"user-{u:02d}", text.strip(), end, CLASSES[truth]))
    rows.sort(key=lambda r: r[0])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["timestamp", "user", "text", "control", "truth"])
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="chat log of test sentences")
    args = parser.parse_args(argv)
    config = TrainConfig(seed=args.seed)
    torch.set_num_threads(config.threads)
    t0 = time.monotonic()
    train_set, val_set, test_set = split(sentiment_corpus(), config.seed)
    tok = Tokenizer.fit((text for text, _ in train_set), min_count=config.min_count)
    net, log = train(config, tok, train_set, val_set)
    majority = majority_class(train_set)
    results = {
        "test_accuracy": round(accuracy(net, tok, test_set), 4),  # the held-out split, read once
        "validation_accuracy": round(accuracy(net, tok, val_set), 4),
        "majority_class_test_accuracy": round(
            sum(label == majority for _, label in test_set) / len(test_set), 4
        ),
        "lexicon_test_accuracy": round(lexicon_accuracy(tok, train_set, test_set), 4),
        "sizes": {
            "train": len(train_set),
            "validation": len(val_set),
            "test": len(test_set),
            "vocabulary": tok.size,
        },
        "seconds": round(time.monotonic() - t0, 1),
    }
    info = ModelInfo(
        version=1,
        features={"tokenizer": tok.to_features(), "classes": CLASSES},
        trained_on={"corpus": "UCI Sentiment Labelled Sentences (models/assets/sentiment_corpus)", **results},
    )
    model = from_torch(net.gru, net.linear, head_kind="classifier", embedding=net.embedding, info=info)
    save_bundle(model, args.out)
    write_sample(test_set, args.sample, users=24, seed=config.seed)
    record = {"config": asdict(config), "epochs": log, **results}
    args.out.with_suffix(".log.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
