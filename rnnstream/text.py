"""What the sink receives from a text model (``connectors.text``): a many-to-one model labels a user's
message stream at each end marker. Used when the config has a ``text:`` section and ``scoring.kind`` is
``raw``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from connectors.base import Message
from rnnstream.pipeline import Batch

SENTIMENT_CORPUS = Path(__file__).resolve().parents[1] / "models" / "assets" / "sentiment_corpus"


def sentiment_corpus() -> list[tuple[str, int]]:
    """``(text, class)`` of every labelled sentence of the shipped corpus (``SENTIMENT_CORPUS``, see its
    ``SOURCE.md``; class 1 = positive), file by file in a fixed order; empty, unlabelled entries skipped."""
    out = []
    for name in ("amazon", "imdb", "yelp"):
        for item in json.loads((SENTIMENT_CORPUS / f"{name}.json").read_text()):
            if item.get("class") in (0, 1) and item["text"].strip():
                out.append((item["text"], int(item["class"])))
    return out


class TextLabels:
    """Per message: nothing (``every_message=False``), or ``{"y": (out,), "tokens": T, "offset"...}``, the
    model's output after the message's last token. At a stream's end marker (``EndScoring``):
    ``{"label": classes[argmax y], "y": (out,), "topic", "partition", "offset", "control": "end",
    "model_version"}`` with ``y`` the model's end output (class probabilities for a classifier head)."""

    table = None
    dtype = np.float32

    def __init__(self, classes: list[str] | None, every_message: bool = False) -> None:
        self.classes = list(classes) if classes else None
        self.every_message = every_message

    def inputs(self, ids: list[str], xs: np.ndarray) -> np.ndarray:
        """The token ids ``(N,) int64`` as they are."""
        return xs

    def documents(self, batch: Batch, xs: np.ndarray, ys: np.ndarray, version: int) -> list[dict | None]:
        """``ys (N, out)``: one row per token of the batch, messages in order."""
        if not self.every_message:
            return [None] * len(batch.items)
        docs: list[dict | None] = []
        row = 0
        for msg, _sid, n, _dec in batch.items:
            row += n
            doc = {"y": ys[row - 1], "tokens": n, "topic": msg.topic, "partition": msg.partition}
            docs.append({**doc, "offset": msg.position, "model_version": version})
        return docs

    def ended(self, message: Message, stream_id: str, y: np.ndarray, version: int) -> dict[str, Any]:
        """``y (out,)``: the stream's end output."""
        best = int(np.argmax(y))
        return {
            "label": self.classes[best] if self.classes and best < len(self.classes) else best,
            "y": y,
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.position,
            "control": "end",
            "model_version": version,
        }
