"""A torch utterance classifier as users write it (embedding → bidirectional RNN → pooling → linear), and
its answer on one whole utterance: the reference the utterance mode must equal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models import from_torch
from models.utterance import UtteranceModel

TORCH_CLASSES = {"rnn_tanh": nn.RNN, "rnn_relu": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class UtteranceReference:
    module: nn.RNNBase
    embedding: nn.Embedding | None
    head: nn.Linear | None
    pooling: str
    model: UtteranceModel

    def run(self, seq: np.ndarray) -> np.ndarray:
        """One utterance alone through the torch modules: ``(T, F)`` or ``(T,)`` ids → ``(out,)``."""
        with torch.no_grad():
            x = torch.as_tensor(seq)
            if self.embedding is not None:
                x = self.embedding(x)
            out, final = self.module(x.unsqueeze(0) if self.module.batch_first else x.unsqueeze(1))
            out = out[0] if self.module.batch_first else out[:, 0]  # (T, directions * H)
            h_n = final[0] if isinstance(final, tuple) else final  # (layers * directions, 1, H)
            if self.pooling == "last":
                pooled = torch.cat([h_n[-2], h_n[-1]], 1)[0] if self.module.bidirectional else h_n[-1, 0]
            elif self.pooling == "mean":
                pooled = out.mean(0)
            else:
                pooled = out.amax(0)
            return (self.head(pooled) if self.head is not None else pooled).numpy()

    def random_inputs(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """``(T, input_size) float32`` frames or ``(T,) int64`` ids."""
        if self.embedding is not None:
            return rng.integers(0, self.embedding.num_embeddings, size=length)
        return rng.standard_normal((length, self.module.input_size)).astype(np.float32)


def make_utterance_reference(
    kind: str = "gru",
    num_layers: int = 1,
    bidirectional: bool = True,
    num_embeddings: int = 0,
    pooling: str = "last",
    head_out: int = 3,
    max_frames: int = 12,
    input_size: int = 4,
    hidden_size: int = 6,
    proj_size: int = 0,
    batch_first: bool = False,
    seed: int = 0,
) -> UtteranceReference:
    torch.manual_seed(seed)
    kwargs: dict = {"bidirectional": bidirectional, "batch_first": batch_first}
    if kind.startswith("rnn"):
        kwargs["nonlinearity"] = kind.split("_")[1]
    if proj_size:
        kwargs["proj_size"] = proj_size
    module = TORCH_CLASSES[kind](input_size, hidden_size, num_layers, **kwargs).eval()
    embedding = nn.Embedding(num_embeddings, input_size) if num_embeddings else None
    pooled = (2 if bidirectional else 1) * (proj_size or hidden_size)
    head = nn.Linear(pooled, head_out) if head_out else None
    model = from_torch(module, head, embedding=embedding, utterance_frames=max_frames, pooling=pooling)
    return UtteranceReference(module, embedding, head, pooling, model)
