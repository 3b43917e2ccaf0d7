"""TBPTT(k1, k2): its gradients are plain autograd's on the same window from the same (detached) start
state, truncation really stops gradients, and a poisoned batch changes no weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import from_torch
from models.tbptt import TBPTT


def _setup(kind: type[nn.Module] = nn.LSTM, seed: int = 0):
    model, _rnn, _head, carried, window = _setup_with_reference(kind, seed)
    return model, carried, window


def _setup_with_reference(kind: type[nn.Module], seed: int = 0):
    torch.manual_seed(seed)
    rnn, head = kind(3, 8, 2), nn.Linear(8, 2)
    model = from_torch(rnn, head, head_kind="regression").train()
    history = torch.randn(20, 4, 3)  # (T, B, F)
    with torch.no_grad():
        _, carried = model(history[:12])  # the state a replay buffer would hold at step 12
    return model, rnn, head, carried, history[12:]


@pytest.mark.parametrize("kind", [nn.RNN, nn.GRU, nn.LSTM])
def test_gradients_equal_plain_autograd_on_the_same_window(kind):
    """Reference: the original torch modules (cuDNN-style ``nn.LSTM`` etc.) run over the same window from
    the same start state, differentiated by plain autograd."""
    model, rnn, head, carried, window = _setup_with_reference(kind)
    tbptt = TBPTT(k1=3, k2=8)
    targets = torch.randn(3, 4, 2)
    loss, _ = tbptt.loss(model, carried, window, targets, nn.functional.mse_loss)
    loss.backward()

    # torch layout of the start state: (num_layers, B, H) per state tensor
    per_layer = 2 if kind is nn.LSTM else 1
    h0 = torch.stack(carried[0::per_layer]).detach()
    hx = (h0, torch.stack(carried[1::per_layer]).detach()) if kind is nn.LSTM else h0
    out, _ = rnn(window, hx)
    ref_loss = nn.functional.mse_loss(head(out[-3:]), targets)
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k, layer in enumerate(model.layers):
        for name, param in layer.named_parameters():
            ref = getattr(rnn, f"{name}_l{k}").grad
            torch.testing.assert_close(param.grad, ref, rtol=1e-4, atol=1e-6, msg=f"{name}_l{k}")
    torch.testing.assert_close(model.head.linear.weight.grad, head.weight.grad, rtol=1e-4, atol=1e-6)


def test_no_gradient_flows_past_the_window_start():
    model, carried, window = _setup()
    start = [s.clone().requires_grad_(True) for s in carried]
    loss, final = TBPTT(2, 5).loss(model, start, window[:5], torch.randn(2, 4, 2), nn.functional.mse_loss)
    loss.backward()
    assert all(s.grad is None for s in start)
    assert all(not f.requires_grad for f in final)


def test_poisoned_batch_changes_no_weight():
    model, carried, window = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = window[:6].clone()
    poisoned[2, 1, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, _norm = TBPTT(3, 6).step(
        model, opt, carried, poisoned, torch.randn(3, 4, 2), nn.functional.mse_loss
    )
    assert loss != loss  # NaN
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_an_update_lowers_the_loss():
    model, carried, window = _setup()
    tbptt, targets = TBPTT(4, 8), torch.zeros(4, 4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first, _ = tbptt.step(model, opt, carried, window, targets, nn.functional.mse_loss)
    for _ in range(20):
        last, _ = tbptt.step(model, opt, carried, window, targets, nn.functional.mse_loss)
    assert last < 0.5 * first


def test_window_lengths_are_checked():
    model, carried, window = _setup()
    with pytest.raises(ValueError, match="k1 <= k2"):
        TBPTT(5, 3)
    with pytest.raises(ValueError, match="expected 8 timesteps"):
        TBPTT(3, 8).loss(model, carried, window[:5], torch.zeros(3, 4, 2), nn.functional.mse_loss)
