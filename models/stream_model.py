"""``StreamModel``: a stack of recurrent layers stepped one timestep at a time for a batch of streams.

The model is stateless: the engine owns every stream's state and hands the model the rows of the streams
in a step. State is a flat list of tensors, layer by layer: ``[h_0]`` per RNN/GRU layer, ``[h_0, c_0]``
per LSTM layer, each ``(B, width)`` with widths from ``state_widths()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from models.attention import Attention
from models.cells import CELL_KINDS, CellKind, RecurrentLayer, step_layers
from models.decoder import build_decoder
from models.heads import HEAD_KINDS, Head, HeadKind

AttentionKind = Literal["dot", "general", "additive"]
ATTENTION_KINDS: tuple[AttentionKind, ...] = ("dot", "general", "additive")
PoolingKind = Literal["last", "mean", "max"]
POOLING_KINDS: tuple[PoolingKind, ...] = ("last", "mean", "max")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture (weights excluded).

    ``input_size`` is the width the first recurrent layer sees: the event's feature count, or the
    embedding width when ``num_embeddings > 0`` (then each event is one categorical id in
    ``[0, num_embeddings)``).

    Architectures beyond the plain stack (each field's default is the plain stack):

    - ``attention``: ``dot`` / ``general`` (Luong) or ``additive`` (Bahdanau) attention over the last
      ``attention_window`` (K) top-layer states; ``attention_size``: the additive score's hidden width.
    - ``utterance_frames``: > 0 buffers each stream's inputs (at most this many) until its end marker and
      runs the model over the whole utterance then (``bidirectional`` models need it);
      ``utterance_pooling``: what the head reads then (``models.utterance.UtteranceModel``).
    - ``decoder``: an encoder-decoder's decoder, as ``models.decoder.DecoderSpec.to_dict()``.
    """

    cell: CellKind
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    proj_size: int = 0
    num_embeddings: int = 0
    head: HeadKind | None = None
    head_out: int = 0
    head_bias: bool = True
    learn_initial_state: bool = False
    attention: AttentionKind | None = None
    attention_window: int = 0
    attention_size: int = 0
    utterance_frames: int = 0
    bidirectional: bool = False
    decoder: dict[str, Any] | None = None
    utterance_pooling: PoolingKind = "last"

    def __post_init__(self) -> None:
        if self.cell not in CELL_KINDS:
            raise ValueError(f"cell must be one of {CELL_KINDS}, got {self.cell!r}")
        for name in ("input_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head is not None and (self.head not in HEAD_KINDS or self.head_out < 1):
            raise ValueError(f"head must be one of {HEAD_KINDS} with head_out >= 1")
        attention_ok = self.attention in ATTENTION_KINDS and self.attention_window >= 1
        if self.attention is not None and not attention_ok:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS} with attention_window >= 1")
        if self.utterance_frames < 0:
            raise ValueError(f"utterance_frames must be >= 0, got {self.utterance_frames}")
        if self.utterance_pooling not in POOLING_KINDS:
            raise ValueError(
                f"utterance_pooling must be one of {POOLING_KINDS}, got {self.utterance_pooling!r}"
            )
        if self.bidirectional and not self.utterance_frames:
            raise ValueError(
                "a bidirectional model needs every future timestep: it runs only in utterance mode "
                "(utterance_frames > 0)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model spec keys: {sorted(unknown)}")
        return cls(**data)


@dataclass
class ModelInfo:
    """Metadata carried with a model: its version and the feature settings its inputs were built with
    (normalisation, MFCC parameters, ...), free-form JSON-able values."""

    version: int = 0
    features: dict[str, Any] = field(default_factory=dict)
    trained_on: dict[str, Any] = field(default_factory=dict)


class StreamModel(nn.Module):
    """Embedding (optional) → ``num_layers`` recurrent layers → attention over the top layer's last K
    states (optional, ``models.attention``: the head then reads ``[h_t; context_t]``) → head (optional)."""

    def __init__(self, spec: ModelSpec, info: ModelInfo | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.info = info or ModelInfo()
        self.embedding = (
            nn.Embedding(spec.num_embeddings, spec.input_size) if spec.num_embeddings > 0 else None
        )
        layers = []
        width = spec.input_size
        for _ in range(spec.num_layers):
            layer = RecurrentLayer(spec.cell, width, spec.hidden_size, spec.bias, spec.proj_size)
            layers.append(layer)
            width = layer.output_size
        self.layers = nn.ModuleList(layers)
        self.attention = (
            Attention(spec.attention, spec.attention_window, width, spec.attention_size)
            if spec.attention
            else None
        )
        if self.attention is not None:
            width *= 2  # the head reads [h_t; context_t]
        self.head = Head(spec.head, width, spec.head_out, spec.head_bias) if spec.head else None
        self.decoder = build_decoder(spec) if spec.decoder else None  # models.decoder: encoder-decoder
        self.initial_states = nn.ParameterList(
            nn.Parameter(torch.zeros(w), requires_grad=spec.learn_initial_state) for w in self.state_widths()
        )

    # ---- shapes -------------------------------------------------------------------------------------
    @property
    def categorical(self) -> bool:
        """True when events are categorical ids (through the embedding), not feature vectors."""
        return self.embedding is not None

    @property
    def feature_size(self) -> int:
        """Features per event: ``input_size``, or 1 (the id) for a categorical model."""
        return 1 if self.categorical else self.spec.input_size

    @property
    def output_size(self) -> int:
        """Width of one event's output: the head's ``out_features``, else the top layer's ``h`` width
        (doubled with attention: ``[h_t; context_t]``)."""
        if self.head is not None:
            return self.head.out_features
        return self.layers[-1].output_size * (2 if self.attention is not None else 1)

    def state_widths(self) -> list[int]:
        """Widths of the flat state list, layer by layer (``h`` then ``c`` for LSTM), then the extras."""
        layers = [w for widths in self.layer_state_widths() for w in widths]
        return layers + [w for _, w in self.extra_states()]

    def layer_state_widths(self) -> list[tuple[int, ...]]:
        """Per recurrent layer, the widths of its state tensors: ``(h,)``, or ``(h, c)`` for LSTM."""
        return [layer.state_widths() for layer in self.layers]

    def extra_states(self) -> list[tuple[str, int]]:
        """Named per-stream state tensors after the layers' (``(name, width)``, names from
        ``engine.snapshot.EXTRA_CODES``): none for a plain stack; with attention its ring
        (``attention_states``, ``K * H_top``) and counters (``attention_fill``, 2), ``models.attention``."""
        return self.attention.extra_states() if self.attention is not None else []

    # ---- stepping -----------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """Event inputs to first-layer inputs.

        x: ``(B, input_size)`` float, or ``(B,)`` int64 ids for a categorical model → ``(B, input_size)``.
        """
        return self.embedding(x) if self.embedding is not None else x

    def step(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One timestep for ``B`` streams.

        x: ``(B, input_size)`` float or ``(B,)`` int64 ids; state: flat list, each ``(B, width)``.
        Returns ``(output (B, output_size), new flat state list)``.
        """
        inp, new_state = step_layers(self.layers, self.embed(x), state)
        pos = len(new_state)
        if self.attention is not None:  # models.attention: write h_t into the ring, attend over it
            context, ring, fill = self.attention.step(inp, state[pos], state[pos + 1])
            new_state += [ring, fill]
            inp = torch.cat([inp, context], dim=-1)
        return self.apply_head(inp), new_state

    def steps(self, xs: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``T`` timesteps of ``B`` streams, each layer in one call of PyTorch's sequence kernel
        (``RecurrentLayer.sequence``): what ``step`` gives ``T`` times, with far less overhead per step.

        xs: ``(T, B, input_size)`` float or ``(T, B)`` ids; state: flat list, each ``(B, width)``.
        Returns ``(outputs (T, B, output_size), new flat state list)``.
        """
        inp = self.embed(xs)
        new_state: list[Tensor] = []
        pos = 0
        for layer in self.layers:
            n = 2 if layer.kind == "lstm" else 1
            inp, layer_state = layer.sequence(inp, tuple(state[pos : pos + n]))
            new_state.extend(layer_state)
            pos += n
        if self.attention is not None:  # every step's window at once: Attention.steps
            contexts, ring, fill = self.attention.steps(inp, state[pos], state[pos + 1])
            new_state += [ring, fill]
            inp = torch.cat([inp, contexts], dim=-1)
        return self.apply_head(inp), new_state

    def apply_head(self, h_top: Tensor) -> Tensor:
        """The event output from the top layer's ``h``: ``(B, H_top)`` → ``(B, output_size)``."""
        return self.head(h_top) if self.head is not None else h_top

    def end_output(self, state: list[Tensor]) -> Tensor:
        """A stream's output at its end marker (many-to-one): ``(B, output_size)`` from the flat state
        list of ``B`` ended streams; here the head on the top layer's ``h`` (with attention, on
        ``[h_T; context_T]``, the context of the last step recomputed from the ring)."""
        if self.attention is not None:
            h, ring, fill = self.top_hidden(state), state[-2], state[-1]
            return self.apply_head(torch.cat([h, self.attention.ring_context(h, ring, fill)], dim=-1))
        return self.apply_head(self.top_hidden(state))

    def end_refusals(self, state: list[Tensor]) -> list[str | None]:
        """Per ended stream (flat state list of ``B`` streams), why its end output cannot be given (an
        utterance past its bound, say), or None: here None, except with attention for a stream without
        any event (an empty window: nothing to attend over)."""
        if self.attention is not None:
            empty = (state[-1][:, 1] < 1).tolist()
            why = "no event before the end: attention has no state to attend over"
            return [why if e else None for e in empty]
        return [None] * len(state[0])

    def top_hidden(self, state: list[Tensor]) -> Tensor:
        """The top layer's ``h`` from a flat state list (the layers' tensors, then any extras)."""
        n = 2 if self.layers[-1].kind == "lstm" else 1
        return state[len(state) - len(self.extra_states()) - n]

    def initial_state(self, batch: int) -> list[Tensor]:
        """The state a new stream starts from, repeated for ``batch`` rows."""
        return [p.unsqueeze(0).expand(batch, -1).clone() for p in self.initial_states]

    def forward(self, xs: Tensor, state: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Run whole sequences, time-major: ``xs (T, B, input_size)`` or ``(T, B)`` ids.

        Returns ``(outputs (T, B, output_size), final state)``. Differentiable; used for training and
        as the reference the stepped engine must match.
        """
        if state is None:
            state = self.initial_state(xs.shape[1])
        outputs = []
        for t in range(xs.shape[0]):
            y, state = self.step(xs[t], state)
            outputs.append(y)
        return torch.stack(outputs), state
