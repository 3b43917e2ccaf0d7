"""``UtteranceModel``: a many-to-one model (bidirectional or not) run once per utterance, at its end marker.

A bidirectional layer's backward direction reads the utterance from its last frame back to its first, so
nothing can be computed before the end: per-step streaming refuses such modules
(``models.convert.UnstreamableModelError``). Utterance mode buffers each stream's frames instead, and runs
the whole torch module over the utterance when the stream ends, batched across the streams that end
together (``Engine.end_many``, or ends queued together).

**The buffer is the stream's state** (``extra_states()``), so snapshots, spill, the local checkpoint and
Kafka's changelog carry a half-buffered utterance like any hidden state:

- ``utterance_frames``: ``(B, M * F)``: up to ``M = spec.utterance_frames`` frames of ``F`` features
  (``F = 1`` for a categorical model: the id, exact in float32 below 2**24), frame ``t`` at
  ``[t * F, (t + 1) * F)``; slots past the stream's length are zeros.
- ``utterance_length``: ``(B, 2)``: ``[frames buffered, frames refused past the bound]``.

A frame that arrives when ``M`` are buffered is not written; its stream's refused count goes up, and its
end is refused (``end_refusals``: ``RefusedEndError`` from the engine, counted in ``refused_ends``).

**What the head reads** (``spec.utterance_pooling``), in torch's conventions, from the top layer:

- ``last``: the final hidden states ``h_n`` of ``nn.GRU/LSTM/RNN``: the forward direction's state after
  the last frame ‖ the backward direction's state after the first frame, i.e.
  ``torch.cat([h_n[-2], h_n[-1]], dim=1)`` for a bidirectional module (``h_n[-1]`` otherwise), what a
  typical classifier feeds its linear layer;
- ``mean``: the top layer's outputs averaged over the utterance's frames, ``Σ_t out_t / T``;
- ``max``: their element-wise maximum over the frames, ``max_t out_t``.

Per-step outputs carry nothing (``step`` returns NaN rows; ``step_outputs`` is False, and the pipeline
writes no per-frame documents for such a model, only the end document).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from models.heads import Head
from models.stream_model import ModelInfo, ModelSpec

TORCH_MODULES: dict[str, type[nn.RNNBase]] = {
    "rnn_tanh": nn.RNN,
    "rnn_relu": nn.RNN,
    "gru": nn.GRU,
    "lstm": nn.LSTM,
}
EXACT_IDS = 2**24  # float32 holds every integer below this exactly: the largest vocabulary a buffer keeps


class UtteranceModel(nn.Module):
    """Embedding (optional) → ``nn.RNN/GRU/LSTM`` (``bidirectional`` or not) → pooling → head (optional),
    run over whole utterances buffered in the streams' state. Implements the engine's model protocol
    (``models.stream_model.StreamModel``'s methods the engine calls)."""

    step_outputs = False  # per-step outputs carry nothing: the pipeline writes only the end document

    def __init__(self, spec: ModelSpec, info: ModelInfo | None = None) -> None:
        super().__init__()
        if spec.utterance_frames < 1:
            raise ValueError("an UtteranceModel needs spec.utterance_frames >= 1 (the buffer's bound)")
        if spec.num_embeddings > EXACT_IDS:
            raise ValueError(f"num_embeddings {spec.num_embeddings} > {EXACT_IDS}: ids past it are not exact")
        self.spec = spec
        self.info = info or ModelInfo()
        self.embedding = (
            nn.Embedding(spec.num_embeddings, spec.input_size) if spec.num_embeddings > 0 else None
        )
        self.rnn = _torch_module(spec)
        self.head = Head(spec.head, self.pooled_size, spec.head_out, spec.head_bias) if spec.head else None
        self.initial_states = nn.ParameterList(
            nn.Parameter(torch.zeros(w), requires_grad=False) for w in self.state_widths()
        )

    # ---- shapes -------------------------------------------------------------------------------------
    @property
    def categorical(self) -> bool:
        """True when events are categorical ids (through the embedding), not feature vectors."""
        return self.embedding is not None

    @property
    def feature_size(self) -> int:
        """Features per event (``F``): ``input_size``, or 1 (the id) for a categorical model."""
        return 1 if self.categorical else self.spec.input_size

    @property
    def max_frames(self) -> int:
        """The bound ``M`` on an utterance's frames (``spec.utterance_frames``)."""
        return self.spec.utterance_frames

    @property
    def pooled_size(self) -> int:
        """Width the head reads: directions × the top layer's ``h`` width (``proj_size`` or hidden)."""
        directions = 2 if self.spec.bidirectional else 1
        return directions * (self.spec.proj_size or self.spec.hidden_size)

    @property
    def output_size(self) -> int:
        """Width of an utterance's output: the head's ``out_features``, else ``pooled_size``."""
        return self.head.out_features if self.head is not None else self.pooled_size

    def describe(self) -> str:
        """``bidirectional lstm x2 over whole utterances (<= 100 frames)``, say."""
        direction = "bidirectional " if self.spec.bidirectional else ""
        bound = f"(<= {self.max_frames} frames)"
        return f"{direction}{self.spec.cell} x{self.spec.num_layers} over whole utterances {bound}"

    def state_widths(self) -> list[int]:
        """``[M * F, 2]``: the buffered frames and ``[buffered, refused]`` (no per-layer state)."""
        return [w for _, w in self.extra_states()]

    def layer_state_widths(self) -> list[tuple[int, ...]]:
        """None: the recurrent layers run only at the end, from the buffer."""
        return []

    def extra_states(self) -> list[tuple[str, int]]:
        """``[("utterance_frames", M * F), ("utterance_length", 2)]`` (see the module docstring)."""
        return [("utterance_frames", self.max_frames * self.feature_size), ("utterance_length", 2)]

    def initial_state(self, batch: int) -> list[Tensor]:
        """An empty buffer, repeated for ``batch`` rows."""
        return [p.unsqueeze(0).expand(batch, -1).clone() for p in self.initial_states]

    # ---- buffering ----------------------------------------------------------------------------------
    def step(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Buffer one frame per row.

        x: ``(B, F)`` float or ``(B,)`` int64 ids; state: ``[frames (B, M*F), counts (B, 2)]``.
        Row ``b`` with ``n_b = counts[b, 0] < M`` frames gets ``x_b`` written at frame ``n_b`` (and
        ``n_b + 1`` frames); a row at the bound is left as it is and its refused count ``counts[b, 1]``
        goes up.
        Returns ``(NaN (B, output_size): no output before the end, new state)``.
        """
        frames, counts = state
        rows = x.shape[0]
        buffered = counts[:, 0].long()
        has_room = buffered < self.max_frames
        room_rows = has_room.nonzero().squeeze(1)
        new_frames = frames.clone()
        new_frames.view(rows, self.max_frames, self.feature_size)[room_rows, buffered[room_rows]] = (
            x[room_rows].to(frames.dtype).view(-1, self.feature_size)
        )
        new_counts = counts + torch.stack([has_room, ~has_room], dim=1).to(counts.dtype)
        y = torch.full((rows, self.output_size), float("nan"), dtype=frames.dtype, device=frames.device)
        return y, [new_frames, new_counts]

    def steps(self, xs: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``T`` frames of ``B`` streams, ``step`` after ``step``: ``xs (T, B, F)`` or ``(T, B)`` ids →
        ``(NaN (T, B, output_size), new state)``."""
        outputs = []
        for x in xs:
            y, state = self.step(x, state)
            outputs.append(y)
        return torch.stack(outputs), state

    def forward(self, xs: Tensor, state: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """``steps`` from ``state`` (default: empty buffers): ``xs (T, B, F)`` or ``(T, B)`` ids."""
        return self.steps(xs, self.initial_state(xs.shape[1]) if state is None else state)

    # ---- the whole model, at the end ----------------------------------------------------------------
    def end_output(self, state: list[Tensor]) -> Tensor:
        """The utterance outputs of ``B`` ended streams: ``(B, output_size)``, one batched run of the
        whole model over the buffers (``run``); NaN rows for the streams ``end_refusals`` refuses."""
        frames, counts = state
        lengths = counts[:, 0].long()
        usable = (
            (self._well_formed(frames, counts) & (lengths > 0) & (counts[:, 1] == 0)).nonzero().squeeze(1)
        )
        out = torch.full(
            (len(frames), self.output_size), float("nan"), dtype=frames.dtype, device=frames.device
        )
        if len(usable):
            longest = int(lengths[usable].max())
            buffers = frames[usable].view(len(usable), self.max_frames, self.feature_size)[:, :longest]
            padded = buffers.transpose(0, 1)  # (T, n, F), time-major
            inputs = padded[..., 0].long() if self.categorical else padded
            out[usable] = self.run(inputs, lengths[usable])
        return out

    def end_refusals(self, state: list[Tensor]) -> list[str | None]:
        """Per ended stream: why its utterance has no output (empty, or past the bound), or None."""
        well_formed = self._well_formed(*state).tolist()
        counts = state[1].tolist()
        return [
            self._refusal(int(buffered), int(refused))
            if ok
            else "corrupt utterance buffer (a damaged state row?)"
            for (buffered, refused), ok in zip(counts, well_formed, strict=True)
        ]

    def _well_formed(self, frames: Tensor, counts: Tensor) -> Tensor:
        """``(B,)`` bool: counts whole and in range (``0 <= buffered <= M``, ``refused >= 0``), frames
        finite, ids in ``[0, num_embeddings)``: what a buffer written by ``step`` always is (a state row
        restored from elsewhere may not be)."""
        whole = (counts == counts.round()).all(1) & (counts[:, 0] >= 0) & (counts[:, 0] <= self.max_frames)
        ok = whole & (counts[:, 1] >= 0) & torch.isfinite(frames).all(1)
        if self.categorical:
            ids = frames
            ok &= ((ids == ids.round()) & (ids >= 0) & (ids < self.spec.num_embeddings)).all(1)
        return ok

    def _refusal(self, buffered: int, refused: int) -> str | None:
        if refused:
            return (
                f"utterance of {buffered + refused}+ frames passes the bound of {self.max_frames} "
                "(utterance_frames)"
            )
        if not buffered:
            return "empty utterance: no frame before its end marker"
        return None

    def run(self, xs: Tensor, lengths: Tensor) -> Tensor:
        """The whole model over ``B`` utterances of different lengths: what the torch module gives on
        each utterance alone.

        xs: ``(T, B, F)`` float or ``(T, B)`` int64 ids, time-major, padded past each length;
        lengths: ``(B,)`` int64, each in ``[1, T]``. Returns ``(B, output_size)``.
        """
        inp = self.embedding(xs) if self.embedding is not None else xs
        if bool((lengths == xs.shape[0]).all()):  # no padding: the plain kernel (torch's fast path)
            out, final = self.rnn(inp)
        else:
            out, final = self.rnn(pack_padded_sequence(inp, lengths.cpu(), enforce_sorted=False))
        h_n = final[0] if isinstance(final, tuple) else final  # (layers * directions, B, H or P)
        pooled = self._pool(out, h_n, lengths)
        return self.head(pooled) if self.head is not None else pooled

    def _pool(self, out: PackedSequence | Tensor, h_n: Tensor, lengths: Tensor) -> Tensor:
        """``(B, pooled_size)`` from the top layer (see the module docstring for each pooling)."""
        pooling = self.spec.utterance_pooling
        if pooling == "last":
            return torch.cat([h_n[-2], h_n[-1]], dim=1) if self.spec.bidirectional else h_n[-1]
        if isinstance(out, PackedSequence):
            out, _ = pad_packed_sequence(out)  # (T, B, pooled_size), zeros past each length
        lengths = lengths.to(out.device)
        if pooling == "mean":
            return out.sum(0) / lengths[:, None].to(out.dtype)
        padding = torch.arange(out.shape[0], device=out.device)[:, None] >= lengths[None, :]  # (T, B)
        return out.masked_fill(padding[..., None], float("-inf")).amax(0)


def _torch_module(spec: ModelSpec) -> nn.RNNBase:
    """The ``nn.RNN/GRU/LSTM`` of ``spec``, parameters named as torch names them (``weight_ih_l0``,
    ``..._reverse``): a trained module's ``state_dict`` loads into it as it is."""
    kwargs: dict[str, object] = {"bias": spec.bias, "bidirectional": spec.bidirectional}
    if spec.cell.startswith("rnn_"):
        kwargs["nonlinearity"] = spec.cell.removeprefix("rnn_")
    if spec.proj_size:
        kwargs["proj_size"] = spec.proj_size
    return TORCH_MODULES[spec.cell](spec.input_size, spec.hidden_size, spec.num_layers, **kwargs)
