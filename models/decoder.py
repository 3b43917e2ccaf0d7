"""Encoder-decoder models: the stream's state is the encoder; a decoder generates a sequence from it.

The encoder is an ordinary ``StreamModel`` stack, stepped one event at a time by the engine. On request
(``Engine.decode``) or at a stream's end (the pipeline's end document), ``Decoder.decode`` reads the
encoder's state and decodes greedily, without changing it:

- **initial state** from the encoder's final state ``s_T``:

  - without bridge: layer by layer, ``h_l = h^enc_l`` (and ``c_l = c^enc_l`` when both are LSTMs, else
    ``c_l = 0``): the decoder has the encoder's layer count and width;
  - with a bridge ``nn.Linear(H_enc_top, L_dec * H_dec)``: ``[h_0 | h_1 | ... ] = act(W h^enc_top + b)``
    (``act``: identity or tanh), ``c_l = 0``.

- **greedy loop**, ``t = 1 .. max_len``::

      h_t = decoder_step(x_t, h_{t-1});  o_t = W_out h_t + b_out
      regression:      y_t = o_t,             x_{t+1} = y_t          (x_1 = start_input, default 0)
      classification:  y_t = argmax(o_t),     x_{t+1} = E[y_t]       (x_1 = E[start_token]);
                       stop after y_t = end_token (not part of the result)

``Seq2SeqReference`` is the same computation written with the trained torch modules themselves, one whole
sequence at a time: the offline reference the streamed encoder + ``decode`` must equal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from models.cells import RecurrentLayer, step_layers

if TYPE_CHECKING:
    from models.stream_model import ModelInfo, ModelSpec, StreamModel

DecoderTask = Literal["regression", "classification"]
BridgeActivation = Literal["none", "tanh"]
MAX_DECODE_LEN = 10_000
"""The longest sequence one decode may ask for (a bound on one request's work and memory)."""


@dataclass(frozen=True)
class DecoderSpec:
    """A decoder's architecture (weights excluded); stored as ``ModelSpec.decoder`` (``to_dict``).

    ``input_size``: the decoder's input width (``out_features`` for regression, the embedding width for
    classification); ``encoder_width``: the encoder's top-layer ``h`` width (the bridge's input);
    ``max_len``: a decode's length when the caller gives none (``MAX_DECODE_LEN`` at most).
    """

    cell: Literal["gru", "lstm"]
    input_size: int
    hidden_size: int
    out_features: int
    encoder_width: int
    num_layers: int = 1
    bias: bool = True
    head_bias: bool = True
    task: DecoderTask = "regression"
    num_embeddings: int = 0
    start_token: int = 0
    end_token: int | None = None
    max_len: int = 32
    bridge: bool = False
    bridge_bias: bool = True
    bridge_activation: BridgeActivation = "none"

    def __post_init__(self) -> None:
        if self.cell not in ("gru", "lstm"):
            raise ValueError(f"decoder cell must be 'gru' or 'lstm', got {self.cell!r}")
        if self.task not in ("regression", "classification"):
            raise ValueError(f"decoder task must be 'regression' or 'classification', got {self.task!r}")
        if self.task == "regression" and self.input_size != self.out_features:
            raise ValueError("a regression decoder feeds its output back: input_size must equal out_features")
        if self.task == "classification":
            tokens = [self.start_token] + ([] if self.end_token is None else [self.end_token])
            in_range = all(0 <= t < self.num_embeddings for t in tokens)
            if self.num_embeddings != self.out_features or not in_range:
                raise ValueError(
                    "a classification decoder needs num_embeddings == out_features (one logit per token) "
                    "and start_token / end_token in [0, num_embeddings)"
                )
        if not 1 <= self.max_len <= MAX_DECODE_LEN:
            raise ValueError(f"decoder max_len must be in [1, {MAX_DECODE_LEN}], got {self.max_len}")
        if self.bridge_activation not in ("none", "tanh"):
            raise ValueError(f"bridge_activation must be 'none' or 'tanh', got {self.bridge_activation!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown decoder spec keys: {sorted(unknown)}")
        return cls(**data)


class Decoder(nn.Module):
    """The decoder of an encoder-decoder ``StreamModel`` (``model.decoder``; weights under ``decoder.``).

    ``encoder``: the encoder's ``ModelSpec``, for the layout of its flat state list."""

    def __init__(self, spec: DecoderSpec, encoder: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self._encoder_layers = [2 if encoder.cell == "lstm" else 1] * encoder.num_layers
        self._encoder_lstm = encoder.cell == "lstm"
        if not spec.bridge:
            widths_match = encoder.proj_size == 0 and encoder.hidden_size == spec.hidden_size
            if encoder.num_layers != spec.num_layers or not widths_match:
                raise ValueError(
                    "a decoder without bridge starts from the encoder's layers as they are: it needs the "
                    "encoder's num_layers and hidden_size (no proj_size); add a bridge otherwise"
                )
        layers, width = [], spec.input_size
        for _ in range(spec.num_layers):
            layers.append(RecurrentLayer(spec.cell, width, spec.hidden_size, spec.bias))
            width = spec.hidden_size
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(spec.hidden_size, spec.out_features, bias=spec.head_bias)
        classify = spec.task == "classification"
        self.embedding = nn.Embedding(spec.num_embeddings, spec.input_size) if classify else None
        bridge_out = spec.num_layers * spec.hidden_size
        self.bridge = (
            nn.Linear(spec.encoder_width, bridge_out, bias=spec.bridge_bias) if spec.bridge else None
        )
        self.register_buffer("start_input", torch.zeros(spec.input_size))

    def check_max_len(self, max_len: object) -> int:
        """``max_len`` (None: the spec's) as an int in ``[1, MAX_DECODE_LEN]``, else ``ValueError``."""
        if max_len is None:
            return self.spec.max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= MAX_DECODE_LEN:
            raise ValueError(f"max_len must be an int in [1, {MAX_DECODE_LEN}], got {max_len!r}")
        return max_len

    def initial_state(self, encoder_state: list[Tensor]) -> list[Tensor]:
        """The decoder's flat state (``[h]`` or ``[h, c]`` per layer, each ``(B, hidden_size)``) from the
        encoder's flat state list of ``B`` streams (module docstring: bridge or layer by layer)."""
        starts, pos = [], 0
        for n in self._encoder_layers:
            starts.append(pos)
            pos += n
        batch, hidden = encoder_state[0].shape[0], self.spec.hidden_size
        if self.bridge is not None:
            top = self.bridge(encoder_state[starts[-1]])
            if self.spec.bridge_activation == "tanh":
                top = torch.tanh(top)
            hs = list(top.split(hidden, dim=1))
        else:
            hs = [encoder_state[p] for p in starts]
        state: list[Tensor] = []
        for layer, h in enumerate(hs):
            state.append(h)
            if self.spec.cell == "lstm":
                keep_c = self.bridge is None and self._encoder_lstm
                state.append(encoder_state[starts[layer] + 1] if keep_c else h.new_zeros(batch, hidden))
        return state

    def step(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One decoder step: ``x (B, input_size)`` float or ``(B,)`` token ids → ``(logits or values
        (B, out_features), new flat state)``."""
        inp = self.embedding(x) if self.embedding is not None else x
        h_top, new_state = step_layers(self.layers, inp, state)
        return self.head(h_top), new_state

    def decode(self, encoder_state: list[Tensor], max_len: int) -> list[np.ndarray]:
        """Greedy decoding of ``B`` streams from their encoder states (module docstring), all rows stepped
        together. Returns per stream ``(max_len, out_features) float32`` (regression) or its tokens
        ``(L,) int64`` before the end token, ``L <= max_len`` (classification)."""
        state = self.initial_state(encoder_state)
        batch = encoder_state[0].shape[0]
        if self.embedding is None:
            x = self.start_input.unsqueeze(0).expand(batch, -1)
            values = []
            for _ in range(max_len):
                x, state = self.step(x, state)
                values.append(x)
            return list(torch.stack(values, dim=1).cpu().numpy())
        end = self.spec.end_token
        x = torch.full((batch,), self.spec.start_token, dtype=torch.int64, device=state[0].device)
        lengths = torch.full((batch,), max_len, dtype=torch.int64, device=x.device)
        tokens = []
        for t in range(max_len):
            logits, state = self.step(x, state)
            x = logits.argmax(dim=-1)
            tokens.append(x)
            if end is not None:
                lengths = torch.where((x == end) & (lengths == max_len), t, lengths)
                if bool((lengths < max_len).all()):
                    break
        rows = torch.stack(tokens, dim=1).cpu().numpy()
        return [row[:n] for row, n in zip(rows, lengths.tolist(), strict=True)]


def build_decoder(spec: ModelSpec) -> Decoder:
    """The decoder of an encoder spec whose ``decoder`` field is set (``StreamModel.__init__``)."""
    return Decoder(DecoderSpec.from_dict(spec.decoder or {}), spec)


def seq2seq_from_torch(
    encoder: nn.GRU | nn.LSTM | nn.RNN,
    decoder: nn.GRU | nn.LSTM,
    decoder_head: nn.Linear,
    *,
    bridge: nn.Linear | None = None,
    bridge_activation: BridgeActivation = "none",
    encoder_head: nn.Linear | None = None,
    embedding: nn.Embedding | None = None,
    decoder_embedding: nn.Embedding | None = None,
    start_input: Tensor | None = None,
    start_token: int = 0,
    end_token: int | None = None,
    max_len: int = 32,
    info: ModelInfo | None = None,
) -> StreamModel:
    """An encoder-decoder ``StreamModel`` from trained torch modules (weights copied).

    - ``encoder`` (+ optional ``encoder_head``, ``embedding``): as ``models.from_torch`` takes them; the
      engine streams it and ``end_output`` stays its head.
    - ``decoder``: an ``nn.GRU``/``nn.LSTM`` (time-major or ``batch_first``), ``decoder_head``: its output
      ``nn.Linear``. With ``decoder_embedding`` (``nn.Embedding``) the decoder classifies tokens
      (``start_token``, ``end_token``); without, it regresses and feeds its outputs back (``start_input``:
      its first input, default zeros).
    - ``bridge``: an optional ``nn.Linear(H_enc_top, num_layers * H_dec)`` (+ ``bridge_activation``).
    """
    from models.build import build_model
    from models.convert import from_torch

    base = from_torch(encoder, encoder_head, embedding=embedding, info=info)
    classify = decoder_embedding is not None
    dspec = DecoderSpec(
        cell="lstm" if isinstance(decoder, nn.LSTM) else "gru",
        input_size=decoder.input_size,
        hidden_size=decoder.hidden_size,
        out_features=decoder_head.out_features,
        encoder_width=base.layers[-1].output_size,
        num_layers=decoder.num_layers,
        bias=decoder.bias,
        head_bias=decoder_head.bias is not None,
        task="classification" if classify else "regression",
        num_embeddings=decoder_embedding.num_embeddings if classify else 0,
        start_token=start_token,
        end_token=end_token,
        max_len=max_len,
        bridge=bridge is not None,
        bridge_bias=bridge is None or bridge.bias is not None,
        bridge_activation=bridge_activation,
    )
    if not isinstance(decoder, nn.GRU | nn.LSTM) or getattr(decoder, "proj_size", 0) or decoder.bidirectional:
        raise ValueError("the decoder must be a unidirectional nn.GRU or nn.LSTM without proj_size")
    model = build_model(replace(base.spec, decoder=dspec.to_dict()), base.info)
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        _copy_decoder(model.decoder, decoder, decoder_head, bridge, decoder_embedding, start_input)
    device = next(encoder.parameters()).device
    return model.to(device).eval()


def _copy_decoder(
    target: Decoder,
    decoder: nn.GRU | nn.LSTM,
    head: nn.Linear,
    bridge: nn.Linear | None,
    embedding: nn.Embedding | None,
    start_input: Tensor | None,
) -> None:
    """Copy the trained torch modules' weights into ``target`` (shapes checked by ``copy_``)."""
    for k, layer in enumerate(target.layers):
        for name, param in layer.named_parameters():
            param.copy_(getattr(decoder, f"{name}_l{k}"))
    target.head.load_state_dict(head.state_dict())
    if bridge is not None:
        target.bridge.load_state_dict(bridge.state_dict())
    if embedding is not None:
        target.embedding.load_state_dict(embedding.state_dict())
    if start_input is not None:
        target.start_input.copy_(start_input)


class Seq2SeqReference(nn.Module):
    """The offline reference: the trained torch modules run over one whole sequence, then the greedy
    decoder loop (module docstring), written with ``nn.GRU``/``nn.LSTM`` themselves (time-major)."""

    def __init__(
        self,
        encoder: nn.GRU | nn.LSTM | nn.RNN,
        decoder: nn.GRU | nn.LSTM,
        decoder_head: nn.Linear,
        *,
        bridge: nn.Linear | None = None,
        bridge_activation: BridgeActivation = "none",
        embedding: nn.Embedding | None = None,
        decoder_embedding: nn.Embedding | None = None,
        start_input: Tensor | None = None,
        start_token: int = 0,
        end_token: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.decoder, self.decoder_head = encoder, decoder, decoder_head
        self.bridge, self.bridge_activation = bridge, bridge_activation
        self.embedding, self.decoder_embedding = embedding, decoder_embedding
        self.start_input = start_input if start_input is not None else torch.zeros(decoder.input_size)
        self.start_token, self.end_token = start_token, end_token

    def forward(self, xs: Tensor, max_len: int) -> Tensor:
        """``xs (T, F)`` float (or ``(T,)`` ids) → ``(max_len, out)`` values or ``(L,)`` tokens."""
        x = self.embedding(xs) if self.embedding is not None else xs
        _, final = self.encoder(x.unsqueeze(0 if self.encoder.batch_first else 1))
        hidden = self._decoder_start(final)
        if self.decoder_embedding is None:
            y, values = self.start_input.view(1, 1, -1), []
            for _ in range(max_len):
                out, hidden = self.decoder(y, hidden)
                y = self.decoder_head(out)
                values.append(y[0, 0])
            return torch.stack(values)
        token, tokens = torch.tensor([[self.start_token]]), []
        for _ in range(max_len):
            out, hidden = self.decoder(self.decoder_embedding(token), hidden)
            token = self.decoder_head(out).argmax(dim=-1)
            if token.item() == self.end_token:
                break
            tokens.append(token.item())
        return torch.tensor(tokens, dtype=torch.int64)

    def _decoder_start(self, final: Tensor | tuple[Tensor, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        """The decoder's ``h_0`` (or ``(h_0, c_0)``), each ``(L_dec, 1, H_dec)``, from the encoder's."""
        h_enc, c_enc = final if isinstance(final, tuple) else (final, None)
        layers, width = self.decoder.num_layers, self.decoder.hidden_size
        if self.bridge is not None:
            h = self.bridge(h_enc[-1]).view(layers, 1, width)
            h = torch.tanh(h) if self.bridge_activation == "tanh" else h
            c = torch.zeros_like(h)
        else:
            h = h_enc
            c = c_enc if c_enc is not None else torch.zeros_like(h)
        return (h, c) if isinstance(self.decoder, nn.LSTM) else h
