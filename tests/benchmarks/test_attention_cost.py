"""``benchmarks/attention_cost.py``: its baseline computes what the reference computes (an honest
contender), and a row measures all three contenders."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from benchmarks import attention_cost

KEYS = {"architecture", "setting", "engine_us_per_event", "baseline", "baseline_us_per_event", "speedup"}


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_the_baseline_per_event_equals_the_reference(cell):
    ref = attention_cost._reference(cell, window=3, seed=1)
    single = attention_cost.single_cell(ref, cell)
    xs = torch.randn(7, 1, attention_cost.INPUT_SIZE)
    zero = torch.zeros(1, attention_cost.HIDDEN)
    state, past, outputs = ((zero, zero) if cell == "lstm" else zero), deque(maxlen=3), []
    with torch.no_grad():
        for x in xs:
            y, state = attention_cost.deque_attention_event(ref, single, x, state, past)
            outputs.append(y)
        torch.testing.assert_close(torch.stack(outputs), ref(xs), atol=1e-5, rtol=1e-5)


def test_a_row_measures_the_engine_the_plain_stack_and_the_baseline(monkeypatch):
    monkeypatch.setattr(attention_cost, "STREAMS", 40)
    monkeypatch.setattr(attention_cost, "BATCH", 40)
    row = attention_cost.measure("gru", 4, seconds=0.05, rounds=1)
    assert set(row) >= KEYS | {"plain_us_per_event"}
    assert min(row["engine_us_per_event"], row["plain_us_per_event"], row["baseline_us_per_event"]) > 0
    assert row["speedup"] == pytest.approx(row["baseline_us_per_event"] / row["engine_us_per_event"])
