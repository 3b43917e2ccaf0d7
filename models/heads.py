"""Output heads: what an event's output is, computed from the top layer's new hidden state.

``h: (B, H)`` in, ``(B, out_features)`` out. The head's ``kind`` and sizes are all a bundle needs to
rebuild it; its weights are ordinary parameters.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

HeadKind = Literal["linear", "classifier", "regression"]
HEAD_KINDS: tuple[HeadKind, ...] = ("linear", "classifier", "regression")


class Head(nn.Module):
    """``y = W h + b`` followed by the kind's transform.

    - ``linear``: ``y`` as it is (logits, scores);
    - ``classifier``: ``softmax(y)``, class probabilities summing to 1;
    - ``regression``: ``y * scale + offset``, i.e. a prediction in the target's units when the model was
      trained on standardised targets (``scale``/``offset`` are buffers, default 1 and 0).
    """

    def __init__(self, kind: HeadKind, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS}")
        self.kind: HeadKind = kind
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("offset", torch.zeros(out_features))

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, h: Tensor) -> Tensor:
        """h: ``(B, in_features)`` → ``(B, out_features)``."""
        y = self.linear(h)
        if self.kind == "classifier":
            return torch.softmax(y, dim=-1)
        if self.kind == "regression":
            return torch.addcmul(self.offset, y, self.scale)
        return y

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: HeadKind = "linear") -> Head:
        """A head with a copy of a trained ``nn.Linear``'s weights."""
        head = cls(kind, linear.in_features, linear.out_features, bias=linear.bias is not None)
        head.linear.load_state_dict(linear.state_dict())
        return head
