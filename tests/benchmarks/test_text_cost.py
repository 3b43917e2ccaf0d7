"""``benchmarks/text_cost.py`` gives the architectures table's row, both contenders measured."""

from __future__ import annotations

import pytest

from benchmarks import text_cost

KEYS = {"architecture", "setting", "engine_us_per_event", "baseline", "baseline_us_per_event", "speedup"}


@pytest.mark.slow
def test_quick_row_measures_tokens_through_the_engine_against_the_per_message_rerun():
    (row,) = text_cost.rows(quick=True)
    assert set(row) >= KEYS and row["architecture"].startswith("text stream")
    assert row["engine_us_per_event"] > 0 and row["baseline_us_per_event"] > 0
    assert row["speedup"] == pytest.approx(row["baseline_us_per_event"] / row["engine_us_per_event"])


def test_the_engine_and_the_baseline_give_the_same_labels_at_the_end_markers():
    tokenizer = text_cost.Tokenizer.from_features(text_cost.load_bundle(text_cost.ASSET).info.features)
    module = text_cost.TorchSentiment(tokenizer.size).eval()
    model = text_cost.from_torch(
        module.gru, module.linear, head_kind="classifier", embedding=module.embedding
    )
    load = text_cost.workload(tokenizer, 30, seed=3)
    with text_cost.Engine(model, device="cpu", capacity=8, num_threads=1) as engine:
        got = text_cost.run_engine(engine, text_cost.TextDecoder(tokenizer), load)
    expected = text_cost.run_baseline(module, tokenizer, load)
    assert sorted(got) == sorted(expected) and len(got) == 30
    for user, y in expected.items():
        assert got[user] == pytest.approx(y, abs=1e-5)
