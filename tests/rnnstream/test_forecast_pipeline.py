"""``forecast: {horizon}`` through a real source: a CSV replay into a JSON-lines sink, each document with
its ``"forecasts"`` (``rnnstream.forecast``), equal to the offline torch rollout (raw scoring) and in
reading units (forecast scoring: ``forecasts[0]`` is the document's own ``"forecast"``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from models import load_bundle
from rnnstream.config import load_config
from rnnstream.service import build_pipeline

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "models" / "assets" / "sensor_lstm.safetensors"
HORIZON = 5
pytestmark = [pytest.mark.integration]


def _readings(path: Path, streams: int = 3, rows: int = 25) -> dict[str, list[float]]:
    """A CSV of ``streams`` interleaved sine-like sensors; returns each stream's values in order."""
    rng = np.random.default_rng(7)
    values: dict[str, list[float]] = {f"m{s}": [] for s in range(streams)}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "machine", "value"])
        for t in range(rows):
            for s in range(streams):
                v = round(float(np.sin(t / (3 + s)) + 0.1 * rng.standard_normal()), 4)
                values[f"m{s}"].append(v)
                w.writerow([1_700_000_000 + 60 * t, f"m{s}", v])
    return values


def _run(tmp_path: Path, data: Path, scoring: str) -> list[dict]:
    out = tmp_path / f"{scoring}.jsonl"
    cfg = {
        "model": str(ASSET),
        "source": {
            "type": "csv",
            "paths": [str(data)],
            "stream_column": "machine",
            "timestamp_column": "timestamp",
            "channels": ["value"],
            "speed": None,
        },
        "sink": {"type": "jsonl", "path": str(out)},
        "dead_letters": {"type": "file", "path": str(tmp_path / "dlq.jsonl")},
        "scoring": {"kind": scoring},
        "forecast": {"horizon": HORIZON},
        "checkpoint": {"interval_ms": 1000, "dir": None},
    }
    path = tmp_path / f"{scoring}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    build_pipeline(load_config(path)).run()
    return [json.loads(line) for line in out.read_text().splitlines()]


def _torch_lstm_rollout(history: list[float], horizon: int) -> np.ndarray:
    """The shipped sensor model as plain torch: an ``nn.LSTM`` with its weights over ``history``, then
    fed its own predictions (the head: ``linear · scale + offset``). Returns ``(horizon,)``."""
    model = load_bundle(ASSET)
    layer = model.layers[0]
    lstm = nn.LSTM(1, layer.hidden_size)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(lstm, f"{name}_l0").copy_(getattr(layer, name))
        out, hidden = lstm(torch.tensor(history, dtype=torch.float32).view(-1, 1, 1))
        y = model.head(out[-1])
        ys = [y]
        for _ in range(horizon - 1):
            out, hidden = lstm(y.view(1, 1, 1), hidden)
            y = model.head(out[-1])
            ys.append(y)
    return torch.cat(ys).numpy()[:, 0]


def test_raw_outputs_carry_the_offline_torch_rollout_after_each_reading(tmp_path):
    values = _readings(tmp_path / "machines.csv")
    docs = _run(tmp_path, tmp_path / "machines.csv", "raw")
    assert len(docs) == sum(len(v) for v in values.values())
    seen = dict.fromkeys(values, 0)
    for doc in docs:
        sid = doc["stream"]
        seen[sid] += 1
        forecasts = np.array(doc["forecasts"])
        assert forecasts.shape == (HORIZON, 1)
        assert forecasts[0, 0] == pytest.approx(doc["y"][-1][0], abs=1e-6)  # the same units as y
        expected = _torch_lstm_rollout(values[sid][: seen[sid]], HORIZON)
        where = f"{sid} after {seen[sid]} readings"
        np.testing.assert_allclose(forecasts[:, 0], expected, atol=1e-5, rtol=1e-5, err_msg=where)


def test_forecast_scoring_gives_the_forecasts_in_reading_units(tmp_path):
    values = _readings(tmp_path / "machines.csv", rows=15)
    docs = _run(tmp_path, tmp_path / "machines.csv", "forecast")
    assert len(docs) == sum(len(v) for v in values.values())
    for doc in docs:
        assert len(doc["forecasts"]) == HORIZON and all(isinstance(v, float) for v in doc["forecasts"])
        assert doc["forecasts"][0] == pytest.approx(doc["forecast"], rel=1e-6, abs=1e-9)
    last = [d for d in docs if d["stream"] == "m0"][-1]
    assert abs(last["forecasts"][-1] - last["value"]) < 5  # readings in [-1.3, 1.3]: raw units, not z


def test_an_encoder_decoder_end_document_carries_the_decoded_sequence(tmp_path):
    """Interleaved streams with end markers through the pipeline: each end document's ``"decoded"``
    equals the offline ``Seq2SeqReference`` on that stream's readings (regression, LSTM → GRU + bridge)."""
    from connectors.base import Message
    from connectors.codec import Decoder, KeyedDecoder
    from engine import Engine
    from rnnstream.checkpoint import LocalCheckpoint
    from rnnstream.pipeline import Pipeline
    from tests.models.test_decoder import expected_decode, make_seq2seq
    from tests.rnnstream.test_pipeline import ListDeadLetters, ListSink, ListSource

    reference, model = make_seq2seq("lstm", "gru", layers=2, bridge="tanh", max_len=4, seed=9)
    rng = np.random.default_rng(0)
    streams = {f"u{s}": rng.standard_normal((3 + s, 3)).astype(np.float32) for s in range(4)}
    order = [sid for t in range(6) for sid, xs in streams.items() if t < len(xs)]
    cursor = dict.fromkeys(streams, 0)
    events: list[tuple[str, dict]] = []  # (stream, message document), streams interleaved
    for sid in order:
        events.append((sid, {"x": streams[sid][cursor[sid]].tolist()}))
        cursor[sid] += 1
        if cursor[sid] == len(streams[sid]):
            events.append((sid, {"control": "end"}))
    msgs = [Message(json.dumps(doc).encode(), sid.encode(), 0, k) for k, (sid, doc) in enumerate(events)]
    sink, dead = ListSink(), ListDeadLetters()
    engine = Engine(model, device="cpu", freeze_gc=False)
    decoder = KeyedDecoder(Decoder("json", 3))
    Pipeline(engine, ListSource(msgs, batch=5), decoder, sink, dead, LocalCheckpoint(tmp_path)).run()
    ends = {o.stream_id: o.doc for o in sink.outputs if o.doc.get("control") == "end"}
    assert not dead.outputs and set(ends) == set(streams)
    for sid, xs in streams.items():
        want = expected_decode(reference, xs, 4)
        np.testing.assert_allclose(ends[sid]["decoded"], want, atol=1e-5, rtol=1e-5, err_msg=sid)


def test_rnnstream_check_refuses_a_forecast_the_model_or_scoring_cannot_give(tmp_path, ref_factory):
    from models import save_bundle
    from models.rollout import NotForecastableError
    from rnnstream.service import check

    data = tmp_path / "machines.csv"
    _readings(data, rows=2)
    config = {
        "model": str(ASSET),
        "source": {"type": "csv", "paths": [str(data)], "stream_column": "machine", "channels": ["value"]},
        "sink": {"type": "stdout"},
        "scoring": {"kind": "detector", "forecaster": "last"},
        "forecast": {"horizon": 3},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="forecaster: last"):
        check(load_config(path))
    config["scoring"] = {"kind": "raw"}
    config["model"] = str(save_bundle(ref_factory("gru", input_size=1, head_out=2).model, tmp_path / "m.st"))
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(NotForecastableError, match="output_size"):
        check(load_config(path))
    config["forecast"] = {"horizon": 0}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="horizon"):
        load_config(path)
