"""Online fine-tuning beside live inference: drift recovery, poisoned data, swaps under load, versions,
rollback, pause/resume/stop. The worker runs as it does in production (its own process) unless a test
checks pure decision logic or needs a deterministic run (``schedule: inline``)."""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import time

import numpy as np
import pytest
import torch

from benchmarks import finetune_bench
from benchmarks.finetune_bench import copy_model as _copy
from benchmarks.finetune_bench import drift_run, sine_rows, train_sine_forecaster
from engine import Engine, InvalidInputError
from engine.finetune import FineTuneSettings, RoundResult, WorkerCore, serving_bundle, to_numpy_weights
from engine.replay import ChunkBatch, ReplayBuffer
from models.stream_model import ModelSpec, StreamModel


@pytest.fixture(scope="module")
def sine_model() -> StreamModel:
    """An LSTM(1, 16) forecaster trained (here, in ~2 s) on sines of period 20 steps only."""
    model = train_sine_forecaster(hidden=16)
    x = torch.from_numpy(np.stack([sine_rows(t, np.linspace(0, 6, 8), 20) for t in range(41)]))
    with torch.no_grad():
        assert float((model(x[:-1])[0] - x[1:]).pow(2)[10:].mean()) < 1e-3, "pretraining failed"
    return model


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


FAST = dict(k1=8, k2=24, lr=3e-3, batch_size=32, updates_per_round=5, probation_chunks=16)


DRIFT_ERROR_RATIO_MAX = 0.5
"""The project's target, fixed here rather than read from the benchmark (whose ``TARGETS`` also decide when
its drift run stops): after the change, the fine-tuned model's rolling next-step error is at most this
times the frozen model's on the same events."""


@pytest.mark.slow
def test_drift_error_falls_to_half_of_the_frozen_models(sine_model, monkeypatch):
    """64 sine streams switch from period 20 to period 7 at step 300 (the benchmark's drift run). Within
    2,000 events per stream after the change, the fine-tuned engine's next-step error (rolling, 100 steps)
    is at most half the frozen model's on the same events, and the engine serves the version the tuner
    published last: its number, its weights and the bundle a restart would load.

    Rounds run inline (``schedule: inline``: after a wave, at points fixed by the input), so the run is
    a deterministic function of the events and takes seconds; the background worker's recovery is what
    ``rnnstream bench finetune`` measures."""
    engines: list[Engine] = []

    class RecordingEngine(Engine):  # the benchmark's engine, kept for the checks after the run
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(finetune_bench, "Engine", RecordingEngine)
    monkeypatch.setattr(
        finetune_bench, "FineTuneSettings", functools.partial(FineTuneSettings, schedule="inline")
    )
    result = drift_run(sine_model, streams=64, max_steps=2000, seed=1)
    assert result["frozen_error_after"] > 0.1 > result["error_before_drift"], "the drift really hurt"
    ratio = result["finetuned_error_at_recovery"] / result["frozen_error_after"]
    assert ratio <= DRIFT_ERROR_RATIO_MAX, f"fine-tuned error {ratio:.2f}x the frozen model's: {result}"
    assert result["recovered_steps"] is not None, result

    (engine,) = engines
    tuner = engine.finetuner
    assert tuner is not None
    stats = tuner.stats()
    serving = stats.serving_version
    assert stats.published >= 1 and serving != sine_model.info.version, stats
    assert engine.model.info.version == serving == engine.weight_history()[-1][0]
    assert serving_bundle(tuner.versions_dir) == tuner.version_path(serving)  # what a restart loads
    torch.testing.assert_close(
        engine.model.state_dict(), tuner.load_version(serving).state_dict(), rtol=0, atol=0
    )


@pytest.mark.slow
def test_feedback_labels_train_a_classifier_online():
    """Labels arrive later as feedback (one label per 8 steps, for the latest step): a GRU classifier that
    starts at chance learns to tell slow from fast noisy sines, cross-entropy through TBPTT."""
    torch.manual_seed(0)
    engine = Engine(StreamModel(ModelSpec("gru", 1, 16, head="linear", head_out=2)), device="cpu")
    settings = {**FAST, "target": "feedback", "loss": "cross_entropy", "k2": 16, "lr": 1e-2}
    tuner = engine.start_finetuning(FineTuneSettings(**settings, min_train_chunks=16))
    rng = np.random.default_rng(0)
    n = 32
    ids = [f"s{i}" for i in range(n)]
    labels = np.arange(n) % 2
    periods, phases = np.where(labels == 0, 16.0, 5.0), rng.uniform(0, 2 * np.pi, n)
    accuracy: list[float] = []
    try:
        for step in range(6000):
            x = np.sin(2 * np.pi * step / periods + phases) + 0.1 * rng.standard_normal(n)
            out = engine.step_many(ids, x.astype(np.float32)[:, None])
            accuracy.append(float((out.argmax(1) == labels).mean()))
            if step % 8 == 7:
                for sid, label in zip(ids, labels, strict=True):
                    engine.feedback(sid, int(label))
            time.sleep(0.002)
            if step > 300 and np.mean(accuracy[-200:]) >= 0.95:
                break
    finally:
        engine.close()
    stats = tuner.stats()
    assert np.mean(accuracy[16:200]) < 0.8, "the untrained model is not already good"
    assert np.mean(accuracy[-200:]) >= 0.95, stats
    assert stats.published >= 1 and stats.buffer["labels"] > 0


def _collapse(path: list[int]) -> list[int]:
    """CTC's greedy reading: merge repeats, drop blanks (0)."""
    return [c for i, c in enumerate(path) if c != 0 and (i == 0 or path[i - 1] != c)]


def _symbol_events(rng: np.random.Generator):
    """Endless ``(x (3,), symbol)``: bursts of 2-4 steps of a noisy one-hot symbol 1..3, then 1-3 steps of
    noise (symbol 0). The transcript of a span is the collapsed symbol path: unaligned labels."""
    while True:
        symbol = int(rng.integers(1, 4))
        for _ in range(int(rng.integers(2, 5))):
            yield (
                np.eye(3, dtype=np.float32)[symbol - 1] + 0.1 * rng.standard_normal(3).astype(np.float32),
                symbol,
            )
        for _ in range(int(rng.integers(1, 4))):
            yield 0.1 * rng.standard_normal(3).astype(np.float32), 0


@pytest.mark.slow
def test_ctc_learns_from_unaligned_transcripts():
    """Every 20 steps each stream gets the transcript of its last 20 steps (symbols, no alignment) as
    feedback; with CTC the engine's greedy transcripts become right for >= 95% of the spans."""
    torch.manual_seed(0)
    engine = Engine(StreamModel(ModelSpec("gru", 3, 24, head="linear", head_out=4)), device="cpu")
    settings = {**FAST, "target": "feedback", "loss": "ctc", "k2": 16, "lr": 1e-2, "batch_size": 16}
    tuner = engine.start_finetuning(
        FineTuneSettings(**settings, min_train_chunks=16, min_validation_chunks=4)
    )
    n, span = 16, 20
    ids = [f"s{i}" for i in range(n)]
    sources = [_symbol_events(np.random.default_rng(i)) for i in range(n)]
    truth: list[list[int]] = [[] for _ in range(n)]
    greedy: list[list[int]] = [[] for _ in range(n)]
    correct: list[bool] = []
    try:
        for step in range(8000):
            events = [next(src) for src in sources]
            out = engine.step_many(ids, np.stack([x for x, _ in events]))
            for i, (_, symbol) in enumerate(events):
                truth[i].append(symbol)
                greedy[i].append(int(out[i].argmax()))
            if step % span == span - 1:
                for i, sid in enumerate(ids):
                    transcript = _collapse(truth[i][-span:])
                    correct.append(_collapse(greedy[i][-span:]) == transcript)
                    if transcript:
                        engine.feedback(sid, transcript, start=step - span + 1, end=step + 1)
            time.sleep(0.002)
            if len(correct) > 320 and np.mean(correct[-160:]) >= 0.95:
                break
    finally:
        engine.close()
    stats = tuner.stats()
    assert np.mean(correct[:160]) < 0.5, "the untrained model already transcribes"
    assert np.mean(correct[-160:]) >= 0.95, stats
    assert stats.published >= 1


def test_poisoned_streams_publish_nothing_and_leave_serving_untouched(sine_model):
    """Streams sending huge values: every chunk they make is quarantined, no version is published and the
    clean streams' outputs are exactly the frozen model's."""
    engine = Engine(_copy(sine_model), device="cpu")
    tuner = engine.start_finetuning(FineTuneSettings(**FAST, min_train_chunks=8, max_abs_value=1e3))
    reference = _copy(sine_model)
    clean_state = reference.initial_state(4)
    phases = np.linspace(0, 3, 4)
    try:
        for step in range(600):
            poison = np.full((8, 1), 1e12 if step % 2 else -1e12, np.float32)
            engine.step_many([f"poison-{i}" for i in range(8)], poison)
            x = sine_rows(step, phases, 20)
            out = engine.step_many([f"clean-{i}" for i in range(4)], x)
            with torch.no_grad():
                y, clean_state = reference.step(torch.from_numpy(x), clean_state)
            np.testing.assert_allclose(out, y.numpy(), atol=1e-5)
        stats = tuner.stats()
    finally:
        engine.close()
    assert stats.buffer["quarantined"] > 100
    assert stats.published == 0 and engine.model.info.version == 0
    for name, value in engine.model.state_dict().items():
        torch.testing.assert_close(value, sine_model.state_dict()[name], rtol=0, atol=0)


def _batch_from_model(model: StreamModel, rng: np.random.Generator, k1: int, k2: int, b: int) -> ChunkBatch:
    buf = ReplayBuffer(k1, k2, (1,), validation_every=10**6)
    state = model.initial_state(b)
    ids = list(range(b))
    phases = rng.uniform(0, 6, b)
    for t in range(k2 + 1):
        x = sine_rows(t, phases, 20)
        buf.record(ids, x, state)
        with torch.no_grad():
            _, state = model.step(torch.from_numpy(x), state)
    batch = buf.sample(b, __import__("random").Random(0))
    assert batch is not None
    return batch


def test_a_nan_batch_is_skipped_and_nothing_is_published(sine_model):
    core = WorkerCore(sine_model.spec.to_dict(), to_numpy_weights(sine_model), FineTuneSettings(**FAST))
    rng = np.random.default_rng(0)
    good = _batch_from_model(sine_model, rng, 8, 24, 16)
    poisoned = _batch_from_model(sine_model, rng, 8, 24, 16)
    poisoned.xs[3, 2, 0] = np.nan
    poisoned.targets[0, 5, 0] = np.inf
    before = to_numpy_weights(core.serving)
    result = core.round([good, poisoned], good, None)
    assert result.skipped == 1 and result.decision == "none"
    assert "non-finite" in result.reason
    for name, value in to_numpy_weights(core.serving).items():
        np.testing.assert_array_equal(value, before[name])


def test_feedback_rejects_non_finite_labels(sine_model):
    engine = Engine(_copy(sine_model), device="cpu")
    try:
        with pytest.raises(RuntimeError, match="start_finetuning"):
            engine.feedback("a", 1)
        engine.start_finetuning(FineTuneSettings(**{**FAST, "target": "feedback"}, isolation="thread"))
        engine.step_many(["a"], np.zeros((1, 1), np.float32))
        with pytest.raises(InvalidInputError, match="finite"):
            engine.feedback("a", [float("nan")])
        assert engine.feedback("a", [0.25]) == 1
    finally:
        engine.close()


def test_a_worse_version_on_probation_is_rolled_back(sine_model):
    """The serving version does worse than the one before on fresh held-back chunks: the worker rolls
    back, and the tuner swaps the engine back to that version's weights."""
    settings = FineTuneSettings(**{**FAST, "probation_chunks": 4})
    core = WorkerCore(sine_model.spec.to_dict(), to_numpy_weights(sine_model), settings)
    damaged = _copy(sine_model)
    with torch.no_grad():
        for p in damaged.parameters():
            p.add_(0.3 * torch.randn_like(p))
    core.previous = _copy(sine_model)
    core.serving.load_state_dict(damaged.state_dict())
    live = _batch_from_model(sine_model, np.random.default_rng(3), 8, 24, 16)
    result = core.round([], None, live)
    assert result.decision == "rollback" and result.live_serving > result.live_previous
    restored, original = to_numpy_weights(core.serving), to_numpy_weights(sine_model)
    for name, value in original.items():
        np.testing.assert_array_equal(restored[name], value)

    # The coordinator side: a published version, then a rollback decision → the engine serves the old one.
    engine = Engine(_copy(sine_model), device="cpu")
    tuner = engine.start_finetuning(FineTuneSettings(**FAST, isolation="thread"))
    try:
        tuner.pause()
        tuner._apply(RoundResult(decision="publish", weights=to_numpy_weights(damaged)), 0, [])
        assert engine.model.info.version == 1
        assert serving_bundle(tuner.versions_dir) == tuner.version_path(1)  # what a restart loads
        tuner._apply(RoundResult(decision="rollback", reason="test"), 0, [])
        assert engine.model.info.version == 0 and tuner.stats().rolled_back == 1
        assert serving_bundle(tuner.versions_dir) == tuner.version_path(0)
        torch.testing.assert_close(engine.model.state_dict(), sine_model.state_dict(), rtol=0, atol=0)
        assert tuner.versions() == [0, 1]
        assert tuner.load_version(1).info.trained_on["parent_version"] == 0
    finally:
        engine.close()


def test_swaps_under_load_keep_every_streams_state_continuous():
    """3,000 streams stepped in random batches on one thread while another swaps in random weights 40
    times: every output equals the offline run in which each step uses the version in force then."""
    torch.manual_seed(0)
    spec = ModelSpec("gru", 3, 16, head="linear", head_out=2)
    versions = {0: StreamModel(spec).eval()}
    for v in range(1, 41):
        versions[v] = StreamModel(spec).eval()
    engine = Engine(_copy(versions[0]), device="cpu")
    rng = np.random.default_rng(0)
    n_streams, max_batches = 3000, 2000
    log: list[tuple[list[int], np.ndarray, np.ndarray]] = []

    def swapper() -> None:
        for v in range(1, 41):
            engine.swap_weights(versions[v].state_dict(), v)
            time.sleep(0.002)

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        while thread.is_alive() and len(log) < max_batches:  # load for as long as swaps happen
            ids = rng.integers(0, n_streams, size=int(rng.integers(1, 600))).tolist()
            xs = rng.standard_normal((len(ids), 3)).astype(np.float32)
            log.append((ids, xs, engine.step_many(ids, xs)))
        thread.join()
        history = engine.weight_history()
    finally:
        engine.close()
    assert len(history) == 41 and history[-1][0] == 40
    # The reference: replay the same events one at a time, per stream, with the version in force.
    starts = [count for _, count, _ in history]
    states: dict[int, list[torch.Tensor]] = {}
    k = 0
    used = set()
    with torch.no_grad():
        for ids, xs, outs in log:
            for sid, x, out in zip(ids, xs, outs, strict=True):
                version = history[int(np.searchsorted(starts, k, side="right")) - 1][0]
                used.add(version)
                model = versions[version]
                state = states.get(sid, model.initial_state(1))
                y, states[sid] = model.step(torch.from_numpy(x)[None], state)
                np.testing.assert_allclose(out, y[0].numpy(), atol=1e-5)
                k += 1
    assert len(used) >= 10, f"too few versions were live during the load ({sorted(used)})"


@pytest.mark.slow
def test_published_versions_are_kept_and_reproduce_the_outputs(sine_model, tmp_path):
    """With the real worker publishing under load, every output equals the offline run of the kept
    version that served it, and each kept bundle records what trained it."""
    engine = Engine(_copy(sine_model), device="cpu")
    tuner = engine.start_finetuning(FineTuneSettings(**FAST, versions_dir=str(tmp_path / "versions")))
    n = 200
    ids = [f"s{i}" for i in range(n)]
    phases = np.random.default_rng(2).uniform(0, 6.3, n)
    log = []
    deadline = time.monotonic() + 180  # the worker trains at idle priority: slow on a loaded machine
    try:
        for step in itertools.count():
            x = sine_rows(step, phases, 7)
            log.append((x, engine.step_many(ids, x)))
            time.sleep(0.001)
            if (tuner.stats().published >= 3 and step > 300) or time.monotonic() > deadline:
                break
        tuner.stop()
        history = engine.weight_history()
    finally:
        engine.close()
    assert len(history) >= 4, "the worker published at least three versions"
    kept = {v: tuner.load_version(v) for v in tuner.versions()}
    assert {v for v, _, _ in history} <= set(kept)
    for v, model in kept.items():
        assert model.info.version == v
        if v > 0:
            trained_on = model.info.trained_on
            assert (
                trained_on["source"] == "online fine-tuning"
                and trained_on["val_loss"] < trained_on["val_loss_parent"]
            )
    starts = [count for _, count, _ in history]
    state = sine_model.initial_state(n)
    with torch.no_grad():
        for step, (x, out) in enumerate(log):
            version = history[int(np.searchsorted(starts, step * n, side="right")) - 1][0]
            y, state = kept[version].step(torch.from_numpy(x), state)
            np.testing.assert_allclose(out, y.numpy(), atol=1e-5)


def test_pause_resume_stop_and_progress_in_stats(sine_model):
    engine = Engine(_copy(sine_model), device="cpu")
    tuner = engine.start_finetuning(FineTuneSettings(**FAST, min_train_chunks=8, min_new_chunks=1))
    phases = np.linspace(0, 6, 32)
    ids = [f"s{i}" for i in range(32)]
    done = threading.Event()

    def feed() -> None:  # a live source for the whole test
        step = 0
        while not done.is_set():
            engine.step_many(ids, sine_rows(step, phases, 7))
            step += 1
            time.sleep(0.002)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        _wait_for(lambda: tuner.stats().rounds >= 2, 60, "training rounds")
        tuner.pause()  # returns once a round in flight has finished
        paused_at = tuner.stats().rounds
        time.sleep(0.5)
        assert tuner.stats().rounds == paused_at and tuner.stats().state == "paused"
        tuner.resume()
        _wait_for(lambda: tuner.stats().rounds > paused_at, 30, "rounds after resume")
        stats = engine.stats().finetune
        assert stats is not None and stats["updates"] > 0 and stats["state"] == "running"
        assert math.isfinite(stats["train_loss"]) and stats["buffer"]["chunks"] > 0
        tuner.stop()
        stopped_at = tuner.stats().rounds
        time.sleep(0.5)
        assert tuner.stats().rounds == stopped_at and tuner.stats().state == "stopped"
    finally:
        done.set()
        feeder.join()
        engine.close()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="k1"):
        FineTuneSettings(k1=10, k2=5)
    with pytest.raises(ValueError, match="mse"):
        FineTuneSettings(target="next", loss="cross_entropy")
    with pytest.raises(ValueError, match="extra"):
        FineTuneSettings(learning_rate=0.1)
    engine = Engine(StreamModel(ModelSpec("gru", 3, 8, head="linear", head_out=2)), device="cpu")
    try:
        with pytest.raises(ValueError, match="predict its input"):
            engine.start_finetuning(FineTuneSettings(isolation="thread"))
    finally:
        engine.close()


def test_learning_rate_schedules():
    spec = ModelSpec("rnn_tanh", 1, 4, head="linear", head_out=1)
    model = StreamModel(spec)
    weights = to_numpy_weights(model)
    settings = FineTuneSettings(lr_schedule="cosine", lr_schedule_updates=100)
    cosine = WorkerCore(spec.to_dict(), weights, settings)
    assert cosine._lr_factor(0) == 1.0 and abs(cosine._lr_factor(50) - 0.5) < 1e-9
    exponential = WorkerCore(
        spec.to_dict(), weights, FineTuneSettings(lr_schedule="exponential", lr_schedule_updates=10)
    )
    assert abs(exponential._lr_factor(10) - 0.5) < 1e-9
    warm = WorkerCore(spec.to_dict(), weights, FineTuneSettings(warmup_updates=4))
    assert [warm._lr_factor(u) for u in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    sgd = WorkerCore(spec.to_dict(), weights, FineTuneSettings(optimizer="sgd", weight_decay=0.01))
    assert isinstance(sgd.optimiser, torch.optim.SGD) and sgd.optimiser.defaults["weight_decay"] == 0.01


def _inline_run(model: StreamModel, steps: int, tmp) -> tuple[np.ndarray, list[tuple[int, int]], Engine]:
    """16 sine streams of period 7 (the model knows period 20), one wave per step, inline fine-tuning."""
    settings = FineTuneSettings(
        **FAST, schedule="inline", isolation="thread", min_new_chunks=16, versions_dir=str(tmp), seed=3
    )
    engine = Engine(_copy(model), max_delay_ms=0)
    engine.start_finetuning(settings)
    phases = np.linspace(0, 6, 16)
    ids = [f"s{k}" for k in range(16)]
    outs = np.stack([engine.step_many(ids, sine_rows(t, phases, 7)) for t in range(steps)])
    history = [(version, events) for version, events, _ in engine.weight_history()]
    return outs, history, engine


def test_inline_schedule_adapts_between_waves_deterministically(sine_model, tmp_path):
    """``schedule: inline``: rounds run in the step loop after a wave, no worker thread; two runs of the
    same events publish the same versions after the same events and give bit-identical outputs, and the
    adapted model forecasts the new period better than it did at the start."""
    a, history_a, engine_a = _inline_run(sine_model, 300, tmp_path / "a")
    b, history_b, engine_b = _inline_run(sine_model, 300, tmp_path / "b")
    try:
        assert engine_a.finetuner is not None and not engine_a.finetuner._thread.is_alive()
        assert engine_a.finetuner.stats().published >= 1, engine_a.finetuner.stats()
        assert history_a == history_b and len(history_a) > 1
        assert np.array_equal(a, b)
        phases = np.linspace(0, 6, 16)
        truth = np.stack([sine_rows(t + 1, phases, 7) for t in range(300)])
        err = np.abs(a - truth).mean(axis=(1, 2))
        assert err[-50:].mean() < 0.7 * err[20:70].mean(), (err[20:70].mean(), err[-50:].mean())
    finally:
        engine_a.close()
        engine_b.close()


def test_the_worker_samples_its_own_batches_from_the_chunk_store(sine_model):
    """A round needs nothing from the serving side but the chunk store: the worker draws its training
    batches (reproducibly, from its seed) and the held-back chunks itself."""
    buf = ReplayBuffer(8, 24, (1,), validation_every=5)
    state = sine_model.initial_state(32)
    phases = np.random.default_rng(4).uniform(0, 6, 32)
    for t in range(120):
        x = sine_rows(t, phases, 7)
        buf.record(list(range(32)), x, state)
        with torch.no_grad():
            _, state = sine_model.step(torch.from_numpy(x), state)
    assert buf.store is not None
    kept = {c.seq for c in buf.train_chunks()}
    settings = FineTuneSettings(**{**FAST, "min_validation_chunks": 4})
    weights = to_numpy_weights(sine_model)
    a = WorkerCore(sine_model.spec.to_dict(), weights, settings).sampled_round(buf.store, None)
    b = WorkerCore(sine_model.spec.to_dict(), weights, settings).sampled_round(buf.store, None)
    assert a.updates == FAST["updates_per_round"] and a.skipped == 0
    assert a.seq_range and set(range(a.seq_range[0], a.seq_range[1] + 1)) & kept
    assert math.isfinite(a.val_serving) and math.isfinite(a.val_candidate), a
    assert (a.train_loss, a.seq_range) == (b.train_loss, b.seq_range), "same seed, same batches"


def _policy(pid: int) -> tuple[int, int]:
    return os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_the_worker_starts_at_nice_priority_and_drops_to_idle_after_its_start(sine_model):
    """With ``priority: idle`` the worker runs at ``nice`` until its first published version (at most
    ``start_boost_s``), so a fresh start learns even on a busy machine; then at ``SCHED_IDLE``. With
    ``start_boost_s: 0`` it is at ``SCHED_IDLE`` from the start."""
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the worker inherits this niceness
    for boost, expected in ((60.0, (os.SCHED_OTHER, min(19, base + 10))), (0.0, (os.SCHED_IDLE, base))):
        engine = Engine(_copy(sine_model), device="cpu")
        tuner = engine.start_finetuning(FineTuneSettings(**FAST, start_boost_s=boost, nice=10))
        try:
            _wait_for(lambda t=tuner: t.stats().state == "running", 120, "the worker to start")
            worker = tuner._worker
            assert worker is not None
            assert _policy(worker.process.pid) == expected, boost
            if boost:  # after the first published version: idle
                phases = np.linspace(0, 6, 32)
                ids = [f"s{i}" for i in range(32)]
                for step in itertools.count():
                    engine.step_many(ids, sine_rows(step, phases, 7))
                    time.sleep(0.002)
                    if tuner.stats().published or step > 20_000:
                        break
                assert tuner.stats().published >= 1
                pid = worker.process.pid
                _wait_for(lambda p=pid: _policy(p)[0] == os.SCHED_IDLE, 30, "idle priority")
        finally:
            engine.close()


def test_progress_records_when_the_first_update_and_version_came(sine_model, tmp_path):
    _, _, engine = _inline_run(sine_model, 300, tmp_path)
    try:
        stats = engine.finetuner.stats()
    finally:
        engine.close()
    assert stats.updates > 0 and stats.published >= 1
    assert stats.first_update_s is not None and stats.first_version_s is not None
    assert 0 < stats.first_update_s <= stats.first_version_s
