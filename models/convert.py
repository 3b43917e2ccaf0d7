"""Import trained ``torch.nn`` recurrent modules as streamable ``StreamModel``s with identical results."""

from __future__ import annotations

import torch
from torch import nn

from models.attention import Attention, AttentiveRecurrent
from models.cells import CellKind
from models.heads import Head, HeadKind
from models.stream_model import ModelInfo, ModelSpec, PoolingKind, StreamModel
from models.utterance import UtteranceModel

TorchRecurrent = nn.RNN | nn.GRU | nn.LSTM | nn.RNNCell | nn.GRUCell | nn.LSTMCell


class UnstreamableModelError(ValueError):
    """The module cannot be run one timestep at a time (for example, it is bidirectional)."""


def _cell_kind(module: nn.Module) -> CellKind:
    if isinstance(module, nn.LSTM | nn.LSTMCell):
        return "lstm"
    if isinstance(module, nn.GRU | nn.GRUCell):
        return "gru"
    if isinstance(module, nn.RNN | nn.RNNCell):
        return "rnn_relu" if module.nonlinearity == "relu" else "rnn_tanh"
    raise TypeError(
        f"from_torch takes nn.RNN, nn.GRU, nn.LSTM or their Cell variants, not {type(module).__name__}"
    )


def _as_head(head: Head | nn.Linear | None, kind: HeadKind) -> Head | None:
    if head is None or isinstance(head, Head):
        return head
    if isinstance(head, nn.Linear):
        return Head.from_linear(head, kind)
    raise TypeError(f"head must be a models.Head or nn.Linear, not {type(head).__name__}")


def from_torch(
    module: TorchRecurrent | AttentiveRecurrent,
    head: Head | nn.Linear | None = None,
    *,
    head_kind: HeadKind = "linear",
    embedding: nn.Embedding | None = None,
    info: ModelInfo | None = None,
    attention: Attention | None = None,
    utterance_frames: int = 0,
    pooling: PoolingKind = "last",
) -> StreamModel:
    """Build a ``StreamModel`` that steps exactly like ``module``.

    - ``module``: a trained ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` (any ``num_layers``, ``batch_first``
      either way, with or without biases, LSTM ``proj_size``) or ``nn.RNNCell/GRUCell/LSTMCell``.
      Bidirectional modules are refused: their backward direction reads the future, unless
      ``utterance_frames`` > 0.
    - ``head``: an optional ``models.Head`` or ``nn.Linear`` applied to the top layer's ``h``;
      an ``nn.Linear`` becomes a head of ``head_kind`` (``linear``, ``classifier`` or ``regression``).
    - ``embedding``: an optional ``nn.Embedding`` in front, making events categorical ids.
    - ``utterance_frames``: > 0 imports ``module`` (``nn.RNN/GRU/LSTM``, bidirectional or not) in utterance
      mode (``models.utterance.UtteranceModel``): each stream's frames, at most this many, are buffered
      until its end marker, then the whole model runs on them; ``pooling`` says what ``head`` reads then
      (``last``: ``cat(h_n[-2], h_n[-1])`` for a bidirectional module, ``h_n[-1]`` otherwise; ``mean`` or
      ``max`` of the top layer's outputs over the frames).
    - ``attention``: a ``models.attention.Attention`` over the top layer's last K states; the head then
      reads ``[h_t; context_t]``. A ``models.attention.AttentiveRecurrent`` as ``module`` brings its rnn,
      attention and head itself.

    Weights are copied; the returned model is on the module's device, in eval mode.
    """
    if isinstance(module, AttentiveRecurrent):
        if head is not None or attention is not None:
            raise ValueError("an AttentiveRecurrent brings its own head and attention: pass neither")
        return from_torch(
            module.rnn,
            module.head,
            head_kind=head_kind,
            embedding=embedding,
            info=info,
            attention=module.attention,
        )
    kind = _cell_kind(module)
    if utterance_frames > 0:
        return _utterance_from_torch(
            module, kind, _as_head(head, head_kind), embedding, info, utterance_frames, pooling
        )
    if getattr(module, "bidirectional", False):
        raise UnstreamableModelError(
            "bidirectional RNNs cannot be streamed: the backward direction needs every future timestep "
            "before it can produce the first output. Train a unidirectional model for streaming, or import "
            "this one in utterance mode (the whole model at each stream's end): "
            "from_torch(module, head, utterance_frames=<max frames>)."
        )
    is_cell = isinstance(module, nn.RNNCell | nn.GRUCell | nn.LSTMCell)
    head_module = _as_head(head, head_kind)
    if embedding is not None and embedding.embedding_dim != module.input_size:
        raise ValueError(f"embedding_dim {embedding.embedding_dim} != module input_size {module.input_size}")
    spec = ModelSpec(
        cell=kind,
        input_size=module.input_size,
        hidden_size=module.hidden_size,
        num_layers=1 if is_cell else module.num_layers,
        bias=module.bias,
        proj_size=0 if is_cell else getattr(module, "proj_size", 0),
        num_embeddings=embedding.num_embeddings if embedding is not None else 0,
        head=head_module.kind if head_module is not None else None,
        head_out=head_module.out_features if head_module is not None else 0,
        head_bias=head_module is None or head_module.linear.bias is not None,
        attention=attention.kind if attention is not None else None,
        attention_window=attention.window if attention is not None else 0,
        attention_size=attention.attention_size if attention is not None else 0,
    )
    model = StreamModel(spec, info)
    with torch.no_grad():
        for k, layer in enumerate(model.layers):
            suffix = "" if is_cell else f"_l{k}"
            for name, param in layer.named_parameters():
                param.copy_(getattr(module, f"{name}{suffix}"))
        if embedding is not None:
            model.embedding.weight.copy_(embedding.weight)
        if head_module is not None:
            model.head.load_state_dict(head_module.state_dict())
        if attention is not None:
            model.attention.load_state_dict(attention.state_dict())
    device = next(module.parameters()).device
    return model.to(device).eval()


def _utterance_from_torch(
    module: TorchRecurrent,
    kind: CellKind,
    head: Head | None,
    embedding: nn.Embedding | None,
    info: ModelInfo | None,
    utterance_frames: int,
    pooling: PoolingKind,
) -> UtteranceModel:
    """``from_torch`` in utterance mode: ``module``'s weights as they are (``state_dict``), in eval mode."""
    if not isinstance(module, nn.RNNBase):
        raise TypeError(f"utterance mode takes nn.RNN, nn.GRU or nn.LSTM, not {type(module).__name__}")
    if embedding is not None and embedding.embedding_dim != module.input_size:
        raise ValueError(f"embedding_dim {embedding.embedding_dim} != module input_size {module.input_size}")
    spec = ModelSpec(
        cell=kind,
        input_size=module.input_size,
        hidden_size=module.hidden_size,
        num_layers=module.num_layers,
        bias=module.bias,
        proj_size=getattr(module, "proj_size", 0),
        num_embeddings=embedding.num_embeddings if embedding is not None else 0,
        head=head.kind if head is not None else None,
        head_out=head.out_features if head is not None else 0,
        head_bias=head is None or head.linear.bias is not None,
        utterance_frames=utterance_frames,
        bidirectional=module.bidirectional,
        utterance_pooling=pooling,
    )
    model = UtteranceModel(spec, info)
    if head is not None and head.in_features != model.pooled_size:
        raise ValueError(
            f"the head reads {head.in_features} features; {pooling!r} pooling of this module gives "
            f"{model.pooled_size}"
        )
    with torch.no_grad():
        model.rnn.load_state_dict(module.state_dict())
        if embedding is not None:
            model.embedding.weight.copy_(embedding.weight)
        if head is not None:
            model.head.load_state_dict(head.state_dict())
    return model.to(next(module.parameters()).device).eval()
