"""The three recurrent cells, one timestep for a batch of streams.

Each cell's math is written once, here, next to its code. Conventions are PyTorch's (gate order, two
biases), so weights of a trained ``torch.nn.RNN`` / ``GRU`` / ``LSTM`` load as they are.

Shapes: ``B`` streams in the batch, ``I`` input features, ``H`` hidden units, ``P`` LSTM projection size.
Every tensor is float32 (or the model's dtype) on the model's device.

A cell's recurrent state is a tuple of tensors, one row per stream: ``(h,)`` for RNN and GRU, ``(h, c)``
for LSTM. ``state_widths()`` gives their widths so the engine's state store can hold them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

CellKind = Literal["rnn_tanh", "rnn_relu", "gru", "lstm"]
CELL_KINDS: tuple[CellKind, ...] = ("rnn_tanh", "rnn_relu", "gru", "lstm")
GATES: dict[CellKind, int] = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}

State = tuple[Tensor, ...]

# Batch sizes from which the CPU kernels below pay off (measured at hidden 64, one thread): the fused
# oneDNN LSTM step has a ~65 µs fixed cost per call; the GRU serving path runs ~8 small ops.
LSTM_FUSED_MIN_ROWS = 128
GRU_SERVING_MIN_ROWS = 256


class RecurrentLayer(nn.Module):
    """One recurrent layer: the parameters of one cell and its single-step math.

    Parameters follow ``torch.nn.RNN/GRU/LSTM`` layer ``k`` exactly:
    ``weight_ih: (G*H, I)``, ``weight_hh: (G*H, H or P)``, ``bias_ih, bias_hh: (G*H,)`` (absent when
    ``bias=False``), ``weight_hr: (P, H)`` for an LSTM with ``proj_size > 0``; ``G`` is the gate count.
    """

    def __init__(
        self,
        kind: CellKind,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        if kind not in CELL_KINDS:
            raise ValueError(f"unknown cell kind {kind!r}; expected one of {CELL_KINDS}")
        if proj_size and kind != "lstm":
            raise ValueError("proj_size is only defined for LSTM layers")
        if proj_size < 0 or (proj_size >= hidden_size and proj_size != 0):
            raise ValueError(f"proj_size must be in [0, hidden_size), got {proj_size}")
        self.kind: CellKind = kind
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size
        self.has_bias = bias
        gates = GATES[kind] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, self.output_size))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gates))
            self.bias_hh = nn.Parameter(torch.empty(gates))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if proj_size:
            self.weight_hr = nn.Parameter(torch.empty(proj_size, hidden_size))
        else:
            self.register_parameter("weight_hr", None)
        self.reset_parameters()

    @property
    def output_size(self) -> int:
        """Width of ``h``: the projection size for a projected LSTM, else the hidden size."""
        return self.proj_size or self.hidden_size

    def state_widths(self) -> tuple[int, ...]:
        """Widths of this layer's state tensors: ``(H,)`` or, for LSTM, ``(H or P, H)`` for ``(h, c)``."""
        if self.kind == "lstm":
            return (self.output_size, self.hidden_size)
        return (self.hidden_size,)

    def reset_parameters(self) -> None:
        """PyTorch's initialisation: uniform in ``[-1/sqrt(H), 1/sqrt(H)]``."""
        bound = 1.0 / self.hidden_size**0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, state: State) -> State:
        """Advance every row one timestep.

        x: ``(B, I)``; state: this layer's state tuple, rows aligned with ``x``.
        Returns the new state tuple; its first tensor ``h`` is the layer's output.

        Each cell runs on PyTorch's own kernels (``torch.gru_cell``, ``torch.rnn_tanh_cell``, and the
        ``torch.lstm`` sequence kernel for one timestep): differentiable, one GEMM per weight matrix,
        fused gate math, computing exactly the equations below.
        """
        if self.kind == "lstm":
            return self._lstm(x, state[0], state[1])
        if _serving_on_cpu(x, self.weight_hh) and (self.kind != "gru" or x.shape[0] >= GRU_SERVING_MIN_ROWS):
            return (self._gru_serving(x, state[0]) if self.kind == "gru" else self._rnn_serving(x, state[0]),)
        if self.kind == "gru":
            return (self._gru(x, state[0]),)
        return (self._rnn(x, state[0]),)

    def sequence(self, xs: Tensor, state: State) -> tuple[Tensor, State]:
        """``T`` timesteps of every row in one call of PyTorch's sequence kernel (``torch.gru``,
        ``torch.lstm``, ``torch.rnn_tanh/relu``): the equations below, ``T`` times.

        xs: ``(T, B, I)``; state: this layer's state tuple. Returns ``(h of every step (T, B, H or P),
        the final state tuple)``."""
        weights = [
            w
            for w in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.weight_hr)
            if w is not None
        ]
        args = (self.has_bias, 1, 0.0, self.training, False, False)
        if self.kind == "lstm":
            out, h, c = torch.lstm(xs, (state[0].unsqueeze(0), state[1].unsqueeze(0)), weights, *args)
            return out, (h[0], c[0])
        kernel = {"gru": torch.gru, "rnn_tanh": torch.rnn_tanh, "rnn_relu": torch.rnn_relu}[self.kind]
        out, h = kernel(xs, state[0].unsqueeze(0), weights, *args)
        return out, (h[0],)

    def _rnn(self, x: Tensor, h: Tensor) -> Tensor:
        """Elman RNN: ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``, act = tanh or relu."""
        cell = torch.rnn_tanh_cell if self.kind == "rnn_tanh" else torch.rnn_relu_cell
        return cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    def _gru(self, x: Tensor, h: Tensor) -> Tensor:
        """GRU, gate order ``r, z, n``:

        ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``
        ``z = σ(W_iz x + b_iz + W_hz h + b_hz)``
        ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``
        ``h' = (1 - z) ⊙ n + z ⊙ h``
        """
        return torch.gru_cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    # ---- serving on the CPU: the same equations, cheaper ----------------------------------------------
    # Without autograd on the CPU, RNN and GRU steps run as GEMMs (the recurrent one accumulated into the
    # input one's output where the equations add them) plus the gate math in place. ``tanh`` goes through
    # numpy on a contiguous array: torch's CPU ``tanh`` costs ~4 ns an element on the machines we
    # measured, numpy's SIMD one ~1 ns (torch's sigmoid and arithmetic are fast, strided or not).
    # ``torch.gru_cell`` is not fused on the CPU: it allocates each intermediate. Measured at 4,096
    # streams, hidden 64, one thread: GRU 3.4 → 2.4 ms a step, RNN 1.25 → 0.7 ms.

    def _rnn_serving(self, x: Tensor, h: Tensor) -> Tensor:
        """Elman RNN as ``_rnn``: ``act(W_ih x + W_hh h + (b_ih + b_hh))``: two GEMMs into one output,
        then the activation in place."""
        a = _linear(x, self.weight_ih, _bias_sum(self.bias_ih, self.bias_hh))
        a.addmm_(h, self.weight_hh.t())
        if self.kind == "rnn_tanh":
            _tanh_(a)
        else:
            a.relu_()
        return a

    def _gru_serving(self, x: Tensor, h: Tensor) -> Tensor:
        """GRU as ``_gru`` (same gate order and equations); returns ``h' (B, H)``."""
        H = self.hidden_size
        w_hh, b_hh = self.weight_hh, self.bias_hh
        gi = _linear(x, self.weight_ih, self.bias_ih)  # (B, 3H): W_i{r,z,n} x + b_i{r,z,n}
        rz = gi[:, : 2 * H]
        rz.addmm_(h, w_hh[: 2 * H].t())
        if b_hh is not None:
            rz.add_(b_hh[: 2 * H])
        rz.sigmoid_()  # r, z
        hn = _linear(h, w_hh[2 * H :], None if b_hh is None else b_hh[2 * H :])  # W_hn h + b_hn
        n = torch.addcmul(gi[:, 2 * H :], rz[:, :H], hn)  # W_in x + b_in + r ⊙ (W_hn h + b_hn)
        _tanh_(n)
        return torch.lerp(n, h, rz[:, H:])  # h' = n + z ⊙ (h − n)

    def _lstm(self, x: Tensor, h: Tensor, c: Tensor) -> State:
        """LSTM, gate order ``i, f, g, o``:

        ``i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh)``
        ``c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)``
        ``h' = σ(o) ⊙ tanh(c')``, then ``h' = W_hr h'`` when projected (``proj_size > 0``).
        """
        # torch's LSTM sequence kernel run for one timestep: fused gate math on CPU (1.5-3x faster than
        # torch.lstm_cell there from a few hundred rows), and it takes the projection weight too. On the
        # CPU it is oneDNN's, which compiles one kernel per batch size (cached, 1,024 by default): a new
        # size costs ~1.5 ms more at 3,000 rows, and the cache grew ~150 MB in the soak. So a batch runs
        # as pieces whose sizes come from a fixed ladder (``fused_pieces``: 16 sizes an octave),
        # and rows left below the ladder's first rung take torch.lstm_cell (no per-call setup: 15 µs for
        # one row against 70).
        if x.device.type != "cpu":
            return self._lstm_fused(x, h, c)
        parts = []
        for a, b in fused_pieces(x.shape[0]):
            if b - a >= LSTM_FUSED_MIN_ROWS or self.weight_hr is not None:
                parts.append(self._lstm_fused(x[a:b], h[a:b], c[a:b]))
            else:
                w = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
                parts.append(torch.lstm_cell(x[a:b], (h[a:b], c[a:b]), *w))
        if len(parts) == 1:
            return parts[0]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def _lstm_fused(self, x: Tensor, h: Tensor, c: Tensor) -> State:
        """``_lstm`` through ``torch.lstm`` (one timestep of the sequence kernel)."""
        weights = [
            w
            for w in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.weight_hr)
            if w is not None
        ]
        _, h_new, c_new = torch.lstm(
            x.unsqueeze(0),
            (h.unsqueeze(0), c.unsqueeze(0)),
            weights,
            self.has_bias,
            1,
            0.0,
            self.training,
            False,
            False,
        )
        return (h_new[0], c_new[0])


def step_layers(
    layers: Sequence[RecurrentLayer], x: Tensor, state: Sequence[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """One timestep through stacked layers, each feeding its new ``h`` to the next.

    x: ``(B, I)`` first-layer inputs; state: the layers' flat state list (``(h,)`` or ``(h, c)`` per
    layer, each ``(B, width)``; entries after the layers' are ignored). Returns ``(top h (B, H_top), the
    layers' new flat state list)``.
    """
    new_state: list[Tensor] = []
    for layer in layers:
        n = len(layer.state_widths())
        layer_state = layer(x, tuple(state[len(new_state) : len(new_state) + n]))
        new_state.extend(layer_state)
        x = layer_state[0]
    return x, new_state


def fused_pieces(rows: int) -> list[tuple[int, int]]:
    """Split ``rows`` into ``[start, end)`` pieces for the fused LSTM kernel: greedily the largest size
    ``m·2^k`` (``m`` in 16..31: 128, 136, 144, ..., 248, 256, 272, ...) that fits, so at most 16 sizes an
    octave are ever compiled (~160 up to 100k rows) and a piece is never more than 1/16 short of the
    batch. What is left below ``LSTM_FUSED_MIN_ROWS`` is one last piece (for the unfused cell; a
    projected LSTM, which has none, runs it fused too)."""
    pieces: list[tuple[int, int]] = []
    start = 0
    while rows - start >= LSTM_FUSED_MIN_ROWS:
        left = rows - start
        k = left.bit_length() - 5  # left = m·2^k + rest with m in 16..31
        size = (left >> k) << k
        pieces.append((start, start + size))
        start += size
    if start < rows or not pieces:
        pieces.append((start, rows))
    return pieces


def _serving_on_cpu(x: Tensor, weight: Tensor) -> bool:
    """Whether a step can take the numpy gate path: CPU float32, no autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
    )


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x Wᵀ + b``: ``x (B, I)``, ``weight (O, I)``, ``bias (O,)`` or None → a fresh ``(B, O)``."""
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _bias_sum(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    return None if b_ih is None or b_hh is None else b_ih + b_hh


def _tanh_(t: Tensor) -> None:
    """``t ← tanh(t)`` in place, through numpy (``t``: contiguous CPU float32)."""
    a = t.numpy()
    np.tanh(a, out=a)
