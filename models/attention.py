"""Attention over each stream's last K top-layer states: Luong (``dot``, ``general``) and Bahdanau
(``additive``), streamed from a ring buffer in the engine's state store.

Window: at step ``t`` (1-based), the top layer's new state ``h_t`` is written into the ring first, then
the query ``h_t`` attends over the last ``min(t, K)`` states, ``h_t`` included::

    window_t = {h_s : max(1, t - K + 1) <= s <= t}
    score(h_t, h_s) = h_t · h_s                                   (dot)
                      h_t^T W_a h_s                               (general, W_a: (H, H))
                      v^T tanh(W_q h_t + W_k h_s + b)             (additive, W_q, W_k: (A, H), b, v: (A,))
    a_ts = softmax_s(score(h_t, h_s))      over the window only (the ring's unfilled rows are masked out)
    context_t = sum_s a_ts h_s
    head input = [h_t; context_t]          (2 H wide)

``h_t`` is included so that the first step has something to attend over (the window is never empty) and
so that a model with ``K = 1`` is the plain stack with ``context_t = h_t``.

Per-stream state (``StreamModel.extra_states()``; snapshotted, spilled and restored like the layers'):

- ``attention_states (K * H,)``: the ring, row ``r`` at ``[r * H, (r + 1) * H)``;
- ``attention_fill (2,)``: ``[next ring row, rows filled]``, small exact integers as float32. Rows fill in
  order ``0, 1, ...``, so the filled rows are ``0 .. filled - 1`` (all of them once ``filled == K``).

``Attention`` holds the score parameters and the streamed math (``step``: one event per stream, ``steps``:
``T`` events of each stream); ``AttentiveRecurrent`` is the offline torch reference (recurrent module →
attention → ``nn.Linear`` head over whole sequences with a causal band mask), the module users train and
``models.from_torch`` imports.

Shapes: ``B`` streams, ``T`` timesteps, ``K`` window, ``H`` top-layer width, ``A`` additive width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FILL_WIDTH = 2  # attention_fill: [next ring row, rows filled]
STEPS_CHUNK_FLOATS = 1 << 22  # steps(): windows of at most this many floats at a time (16 MiB)


class Attention(nn.Module):
    """The score parameters of one attention ``kind`` over a window of ``window`` states of width
    ``hidden_size``, and the streamed ring-buffer math (module docstring).

    Parameters: ``general``: ``weight (H, H)`` (``W_a``); ``additive``: ``weight_query (A, H)``,
    ``weight_key (A, H)``, ``bias (A,)``, ``v (A,)``; ``dot``: none.
    """

    def __init__(self, kind: str, window: int, hidden_size: int, attention_size: int = 0) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"attention window must be >= 1, got {window}")
        self.kind = kind
        self.window = window
        self.hidden_size = hidden_size
        self.attention_size = attention_size
        if kind == "general":
            self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size))
        elif kind == "additive":
            if attention_size < 1:
                raise ValueError(f"additive attention needs attention_size >= 1, got {attention_size}")
            self.weight_query = nn.Parameter(torch.empty(attention_size, hidden_size))
            self.weight_key = nn.Parameter(torch.empty(attention_size, hidden_size))
            self.bias = nn.Parameter(torch.empty(attention_size))
            self.v = nn.Parameter(torch.empty(attention_size))
        elif kind != "dot":
            raise ValueError(f"unknown attention kind {kind!r}; expected dot, general or additive")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ``[-1/sqrt(H), 1/sqrt(H)]``, as the recurrent layers."""
        bound = 1.0 / self.hidden_size**0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_states(self) -> list[tuple[str, int]]:
        """The per-stream state this attention adds: the ring and its fill counters."""
        return [("attention_states", self.window * self.hidden_size), ("attention_fill", FILL_WIDTH)]

    # ---- the math, once ----------------------------------------------------------------------------
    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """``score(h_t, h_s)`` (module docstring). query: ``(B, T, H)``, keys: ``(B, T, K, H)`` (each
        query's window) → ``(B, T, K)``."""
        if self.kind == "general":
            query = query @ self.weight  # h_t^T W_a
        if self.kind != "additive":  # (1, H) @ (H, K) per query: far faster on CPU than (K, H) @ (H, 1)
            return (query.unsqueeze(-2) @ keys.transpose(-1, -2)).squeeze(-2)
        hidden = keys @ self.weight_key.T  # (B, T, K, A); the sum and tanh in place: no more temporaries
        hidden += (query @ self.weight_query.T + self.bias).unsqueeze(-2)
        return torch.tanh_(hidden) @ self.v

    def context(self, query: Tensor, keys: Tensor, filled: Tensor) -> Tensor:
        """``context_t = sum_s softmax_s(score) h_s`` over the filled window rows.

        query: ``(B, T, H)``; keys: ``(B, T, K, H)``; filled: ``(B, T, K)`` bool (False: masked out; at
        least one True per query) → ``(B, T, H)``."""
        scores = self.scores(query, keys).masked_fill(~filled, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return (weights.unsqueeze(-2) @ keys).squeeze(-2)

    # ---- streamed: the ring ------------------------------------------------------------------------
    def ring_context(self, h: Tensor, ring: Tensor, fill: Tensor) -> Tensor:
        """The context of query ``h (B, H)`` over the ring's filled rows (``ring (B, K*H)``, ``fill
        (B, 2)``, ``h`` already written) → ``(B, H)``."""
        rows = torch.arange(self.window, device=h.device)
        filled = (rows < fill[:, 1:]).unsqueeze(1)  # (B, 1, K)
        keys = ring.view(-1, 1, self.window, self.hidden_size)
        return self.context(h.unsqueeze(1), keys, filled).squeeze(1)

    def step(self, h: Tensor, ring: Tensor, fill: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One timestep of ``B`` streams: write ``h_t`` at each ring's next row, then attend.

        h: ``(B, H)``; ring: ``(B, K*H)``; fill: ``(B, 2)`` ``[next row, rows filled]``.
        Returns ``(context (B, H), new ring (B, K*H), new fill (B, 2))``; inputs are not modified.
        """
        batch, window = h.shape[0], self.window
        at = fill[:, 0].long().remainder(window)  # a corrupt counter cannot index out of the ring
        index = at.view(batch, 1, 1).expand(batch, 1, self.hidden_size)
        ring = ring.view(batch, window, self.hidden_size).scatter(1, index, h.unsqueeze(1)).view(batch, -1)
        fill = torch.stack([((at + 1) % window).to(fill.dtype), (fill[:, 1] + 1).clamp(max=window)], dim=1)
        return self.ring_context(h, ring, fill), ring, fill

    def steps(self, hs: Tensor, ring: Tensor, fill: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``T`` timesteps of ``B`` streams at once: what ``step`` gives ``T`` times.

        The ring, in time order, followed by ``hs`` is each stream's history; query ``t`` attends over
        the ``K`` history rows ending at ``h_t`` (a sliding window, masked where the ring was unfilled).
        hs: ``(T, B, H)``; ring: ``(B, K*H)``; fill: ``(B, 2)``.
        Returns ``(contexts (T, B, H), new ring (B, K*H), new fill (B, 2))``.
        """
        steps, batch = hs.shape[:2]
        window, width = self.window, self.hidden_size
        rows = torch.arange(window, device=hs.device)
        at = fill[:, 0].long().remainder(window)
        oldest_first = (at.unsqueeze(1) + rows) % window  # (B, K): ring rows in time order
        past = ring.view(batch, window, width).gather(1, oldest_first.unsqueeze(-1).expand(-1, -1, width))
        past_filled = rows >= window - fill[:, 1:]  # (B, K): the last `filled` in time order
        history = torch.cat([past, hs.transpose(0, 1)], dim=1)  # (B, K + T, H)
        history_filled = torch.cat([past_filled, past_filled.new_ones(batch, steps)], dim=1)
        keys = history.unfold(1, window, 1)[:, 1:].transpose(-1, -2)  # (B, T, K, H): window of h_t
        filled = history_filled.unfold(1, window, 1)[:, 1:]  # (B, T, K)
        query = hs.transpose(0, 1)
        chunk = max(1, STEPS_CHUNK_FLOATS // (batch * window * width))
        contexts = torch.cat(
            [
                self.context(query[:, t : t + chunk], keys[:, t : t + chunk], filled[:, t : t + chunk])
                for t in range(0, steps, chunk)
            ],
            dim=1,
        )
        next_at = (at + steps) % window
        by_ring_row = (rows - next_at.unsqueeze(1)) % window  # ring row r holds time-order row (r - next)
        last = history[:, steps:].gather(1, by_ring_row.unsqueeze(-1).expand(-1, -1, width))
        fill = torch.stack([next_at.to(fill.dtype), (fill[:, 1] + steps).clamp(max=window)], dim=1)
        return contexts.transpose(0, 1), last.reshape(batch, -1), fill


class AttentiveRecurrent(nn.Module):
    """The offline reference: ``rnn`` (an ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM``, unidirectional) →
    attention of ``kind`` over the last ``window`` states → ``head = nn.Linear(2 H, out_features)`` on
    ``[h_t; context_t]``. Train it as any ``nn.Module``; ``models.from_torch(module)`` streams it.

    ``forward`` computes every step of whole sequences at once with a causal band mask (``s <= t`` and
    ``s > t - K``), independently of the streamed ring code it is the reference for.
    """

    def __init__(
        self,
        rnn: nn.RNN | nn.GRU | nn.LSTM,
        kind: str,
        window: int,
        out_features: int,
        attention_size: int = 0,
        head_bias: bool = True,
    ) -> None:
        super().__init__()
        if rnn.bidirectional:
            raise ValueError(
                "AttentiveRecurrent streams its states: the recurrent module must be unidirectional"
            )
        hidden = rnn.proj_size or rnn.hidden_size  # h's width: an LSTM's projection, if any
        self.rnn = rnn
        self.attention = Attention(kind, window, hidden, attention_size)
        self.head = nn.Linear(2 * hidden, out_features, bias=head_bias)

    def forward(self, xs: Tensor) -> Tensor:
        """xs: ``(T, B, input_size)`` time-major (whatever the rnn's ``batch_first``) → ``(T, B, out)``."""
        hs, _ = self.rnn(xs.transpose(0, 1) if self.rnn.batch_first else xs)
        hs = hs.transpose(0, 1) if self.rnn.batch_first else hs  # (T, B, H)
        att = self.attention
        steps = torch.arange(hs.shape[0], device=hs.device)
        lag = steps.unsqueeze(1) - steps.unsqueeze(0)  # [t, s] = t - s
        band = (lag >= 0) & (lag < att.window)  # (T, S)
        if att.kind == "dot":
            scores = torch.einsum("tbh,sbh->bts", hs, hs)
        elif att.kind == "general":
            scores = torch.einsum("tbh,hk,sbk->bts", hs, att.weight, hs)
        else:
            query = hs @ att.weight_query.T  # (T, B, A)
            key = hs @ att.weight_key.T + att.bias  # (S, B, A)
            scores = torch.einsum("tsba,a->bts", torch.tanh(query.unsqueeze(1) + key.unsqueeze(0)), att.v)
        weights = torch.softmax(scores.masked_fill(~band, float("-inf")), dim=-1)  # (B, T, S)
        contexts = torch.einsum("bts,sbh->tbh", weights, hs)
        return self.head(torch.cat([hs, contexts], dim=-1))
