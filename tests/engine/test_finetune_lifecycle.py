"""The fine-tuning worker's lifecycle on an engine: once stopped, nothing is recorded any more (no cost
left behind), and fine-tuning can be started again."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Engine
from engine.finetune import FineTuneSettings
from models.stream_model import ModelSpec, StreamModel


def _events(engine: Engine, n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(n):
        engine.step_many([f"s{i}" for i in range(8)], rng.standard_normal((8, 1)).astype(np.float32))


def test_a_stopped_finetuner_records_nothing_and_fine_tuning_starts_again():
    model = StreamModel(ModelSpec("gru", 1, 8, head="regression", head_out=1))
    with Engine(model, device="cpu") as engine:
        tuner = engine.start_finetuning(FineTuneSettings(min_train_chunks=10_000))  # records, never trains
        with pytest.raises(RuntimeError, match="already running"):
            engine.start_finetuning()
        _events(engine, 40)
        recorded = tuner.buffer.stats()
        assert sum(recorded.values()) > 0
        tuner.stop()
        _events(engine, 40)
        assert tuner.buffer.stats() == recorded  # detached: the step loop no longer records
        again = engine.start_finetuning(FineTuneSettings(min_train_chunks=10_000))
        _events(engine, 40)
        assert sum(again.buffer.stats().values()) > 0 and engine.finetuner is again
