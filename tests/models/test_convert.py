"""models.from_torch: every supported torch module steps exactly like the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models import Head, UnstreamableModelError, from_torch

CONFIGS = [
    dict(kind="rnn_tanh", num_layers=1),
    dict(kind="rnn_relu", num_layers=2, bias=False),
    dict(kind="gru", num_layers=3, batch_first=True),
    dict(kind="gru", num_layers=1, bias=False),
    dict(kind="lstm", num_layers=2, batch_first=True),
    dict(kind="lstm", num_layers=2, proj_size=3),
    dict(kind="lstm", num_layers=1, bias=False, proj_size=5),
    dict(kind="lstm", num_layers=2, head_out=4, head_kind="classifier"),
    dict(kind="gru", num_layers=1, num_embeddings=11, head_out=3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_stepped_model_matches_torch_module(ref_factory, cfg):
    ref = ref_factory(input_size=4, hidden_size=7, **cfg)
    rng = np.random.default_rng(1)
    seq = ref.random_inputs(rng, 25)
    expected = ref.run(seq)
    with torch.no_grad():
        x = torch.as_tensor(seq).unsqueeze(1)  # (T, 1, ...)
        got, _ = ref.model(x)
    np.testing.assert_allclose(got[:, 0].numpy(), expected, atol=1e-5, rtol=1e-5)
    assert ref.model.output_size == expected.shape[1]


@pytest.mark.parametrize("cell_cls", [nn.RNNCell, nn.GRUCell, nn.LSTMCell])
def test_cell_modules_import(cell_cls):
    torch.manual_seed(0)
    cell = cell_cls(3, 6)
    model = from_torch(cell)
    x = torch.randn(10, 5, 3)  # (T, B, I)
    state = None
    with torch.no_grad():
        outs = []
        for t in range(10):
            state = cell(x[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        got, _ = model(x)
    np.testing.assert_allclose(got.numpy(), torch.stack(outs).numpy(), atol=1e-5)


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_bidirectional_is_refused_with_reason(cls):
    with pytest.raises(UnstreamableModelError, match="bidirectional"):
        from_torch(cls(3, 4, bidirectional=True))


def test_unsupported_module_type():
    with pytest.raises(TypeError, match=r"nn\.RNN, nn\.GRU, nn\.LSTM"):
        from_torch(nn.Linear(3, 4))  # type: ignore[arg-type]


def test_embedding_width_must_match_input_size():
    with pytest.raises(ValueError, match="embedding_dim"):
        from_torch(nn.GRU(4, 5), embedding=nn.Embedding(10, 3))


def test_head_kinds():
    torch.manual_seed(0)
    h = torch.randn(6, 5)
    linear = nn.Linear(5, 3)
    probs = Head.from_linear(linear, "classifier")(h)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    reg = Head.from_linear(linear, "regression")
    reg.scale.fill_(2.0)
    reg.offset.fill_(1.0)
    torch.testing.assert_close(reg(h), linear(h) * 2 + 1)
    with pytest.raises(ValueError, match="unknown head kind"):
        Head("softmax", 5, 3)  # type: ignore[arg-type]


def test_stream_model_is_trainable():
    """Gradients flow through the stepped model (the online fine-tuner relies on it)."""
    model = from_torch(nn.LSTM(3, 4, 2), nn.Linear(4, 1), head_kind="regression").train()
    out, _ = model(torch.randn(7, 2, 3))
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.layers.parameters())
