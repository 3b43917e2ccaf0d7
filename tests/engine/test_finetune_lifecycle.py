"""The fine-tuning worker's lifecycle on an engine: once stopped, nothing is recorded any more (no cost
left behind), and fine-tuning can be started again; a restart resumes without rewriting what was
published (version files are write-once); one fine-tuner per ``versions_dir`` at a time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from benchmarks.finetune_bench import copy_model as _copy
from engine import Engine
from engine.finetune import SERVING_FILE, FineTuneSettings, RoundResult, serving_bundle
from models.bundle import load_bundle, save_bundle
from models.stream_model import ModelInfo, ModelSpec, StreamModel
from rnnstream.config import ServiceConfig, load_config
from rnnstream.service import _engine as _service_engine
from rnnstream.service import _finetune_settings

REPO = Path(__file__).resolve().parents[2]
SPEC = ModelSpec("gru", 1, 8, head="regression", head_out=1)


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


def _idle(versions_dir: str) -> FineTuneSettings:
    """Settings that record and never train (a round needs 10,000 chunks), the worker as a thread."""
    return FineTuneSettings(versions_dir=versions_dir, min_train_chunks=10**4, isolation="thread")


# ---- versions: published files are write-once, resuming keeps their history ------------------------------
def _publish_by_hand(versions_dir, model: StreamModel, version: int, trained_on: dict) -> None:
    """A version as a fine-tuner published it before a restart: its bundle and the SERVING pointer."""
    model.info = ModelInfo(version=version, trained_on=trained_on)
    save_bundle(model, versions_dir / f"v{version:06d}.safetensors")
    (versions_dir / SERVING_FILE).write_text(f"{version}\n")


def test_resuming_keeps_the_serving_versions_file_and_its_recorded_history(tmp_path):
    """A restart loads the serving version (``serving_bundle``) and fine-tunes on: that version's file,
    with what trained it, is left exactly as it was published, and new versions continue after it."""
    versions = tmp_path / "versions"
    history = {"source": "online fine-tuning", "parent_version": 2, "updates_total": 170, "val_loss": 0.25}
    _publish_by_hand(versions, StreamModel(SPEC), 3, history)
    published = (versions / "v000003.safetensors").read_bytes()
    resumed = load_bundle(serving_bundle(versions))
    with Engine(resumed, device="cpu") as engine:
        tuner = engine.start_finetuning(_idle(str(versions)))
        assert tuner.load_version(3).info.trained_on == history
        assert (versions / "v000003.safetensors").read_bytes() == published
        assert tuner._next_version == 4


def test_versions_published_after_a_resume_continue_its_history(tmp_path):
    """The first version published after a restart names the resumed one as parent, and its update count
    goes on from the resumed version's (170 before the restart + 5 now)."""
    versions = tmp_path / "versions"
    _publish_by_hand(versions, StreamModel(SPEC), 3, {"source": "online fine-tuning", "updates_total": 170})
    with Engine(load_bundle(serving_bundle(versions)), device="cpu") as engine:
        tuner = engine.start_finetuning(_idle(str(versions)))
        weights = {k: v.numpy() + 0.01 for k, v in engine.model.state_dict().items()}
        tuner._apply(RoundResult(updates=5, decision="publish", weights=weights), 0, [])
        trained_on = tuner.load_version(4).info.trained_on
        assert (trained_on["parent_version"], trained_on["updates_total"]) == (3, 175)
        assert serving_bundle(versions) == tuner.version_path(4)


def test_a_fresh_start_records_the_initial_models_own_history(tmp_path):
    """The first version kept is the served bundle as it is, with what trained it offline."""
    model = StreamModel(SPEC)
    model.info = ModelInfo(version=0, trained_on={"data": "sine waves", "epochs": 3})
    with Engine(model, device="cpu") as engine:
        tuner = engine.start_finetuning(_idle(str(tmp_path)))
        assert tuner.load_version(0).info.trained_on == {"data": "sine waves", "epochs": 3}


def test_a_published_version_is_never_rewritten(tmp_path):
    """Starting with other weights under a version number already published there is refused (naming the
    key), and the published file is untouched; a second write of a version is refused too."""
    versions = tmp_path / "versions"
    _publish_by_hand(versions, StreamModel(SPEC), 0, {"source": "initial"})
    published = (versions / "v000000.safetensors").read_bytes()
    torch.manual_seed(1)
    with Engine(StreamModel(SPEC), device="cpu") as engine:  # other weights, also version 0
        with pytest.raises(ValueError, match=r"finetune\.versions_dir: .*v000000.* other weights"):
            engine.start_finetuning(_idle(str(versions)))
        assert (versions / "v000000.safetensors").read_bytes() == published
        assert engine.finetuner is None
        again = engine.start_finetuning(_idle(str(tmp_path / "own")))  # not locked
        with pytest.raises(FileExistsError, match=r"v000000.*published"):
            again._save_version(engine.model.state_dict(), 0, {"source": "a second write"})
        assert again.load_version(0).info.trained_on == {"source": "initial"}


# ---- one fine-tuner per versions_dir ---------------------------------------------------------------------
def test_a_second_finetuner_on_the_same_versions_dir_is_refused_until_the_first_stops(tmp_path):
    """Two fine-tuners on one directory would race on version numbers and the SERVING pointer: the second
    is refused with the key and the holder; once the first stops, the directory is free again."""
    settings, model = _idle(str(tmp_path / "v")), StreamModel(SPEC)
    with Engine(_copy(model), device="cpu") as first, Engine(_copy(model), device="cpu") as second:
        tuner = first.start_finetuning(settings)
        with pytest.raises(
            RuntimeError,
            match=rf"finetune\.versions_dir: {re.escape(str(tmp_path / 'v'))} .*pid {os.getpid()}",
        ):
            second.start_finetuning(settings)
        tuner.stop()
        second.start_finetuning(_idle(str(tmp_path / "v")))


def test_another_process_holding_the_versions_dir_is_refused(tmp_path):
    """The same across processes (the lock is the kernel's: it goes when its holder dies, even by kill -9)."""
    versions, model = tmp_path / "v", save_bundle(StreamModel(SPEC), tmp_path / "model.safetensors")
    code = (
        "import time; from engine import Engine; from engine.finetune import FineTuneSettings;"
        "from models.bundle import load_bundle;"
        f"e = Engine(load_bundle({str(model)!r}), device='cpu');"
        f"e.start_finetuning(FineTuneSettings(versions_dir={str(versions)!r}, isolation='thread'));"
        "print('ready', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with Engine(load_bundle(model), device="cpu") as engine:
            with pytest.raises(RuntimeError, match=rf"in use by .*pid {holder.pid}"):
                engine.start_finetuning(_idle(str(versions)))
            holder.kill()
            holder.wait()
            engine.start_finetuning(_idle(str(versions)))
    finally:
        holder.kill()
        holder.wait()


def test_a_relative_versions_dir_is_resolved_once_at_start(tmp_path, monkeypatch):
    """A relative directory is made absolute when the fine-tuner starts (cwd), so it does not move when
    the process changes directory and a refusal names the real path."""
    monkeypatch.chdir(tmp_path)
    with Engine(StreamModel(SPEC), device="cpu") as engine:
        tuner = engine.start_finetuning(_idle("versions"))
        assert tuner.versions_dir == tmp_path / "versions" and tuner.versions_dir.is_absolute()


# ---- the service: each instance of a consumer group keeps its own versions ---------------------------------
def _service_config(tmp_path: Path, instance: str) -> ServiceConfig:
    """The shipped fine-tuning config's shape (relative ``versions_dir``) for consumer-group instance
    ``instance``, as ``rnnstream run cfg.yaml --set kafka.instance_id=...`` loads it."""
    if not (tmp_path / "model.safetensors").exists():
        save_bundle(StreamModel(SPEC), tmp_path / "model.safetensors")
    doc = {
        "model": "model.safetensors",
        "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
        "source": {"type": "kafka", "topics": ["events"], "group_id": "forecasters"},
        "sink": {"type": "kafka", "topic": "forecasts"},
        "engine": {"device": "cpu"},
        "finetune": {"versions_dir": "versions", "min_train_chunks": 10**4, "isolation": "thread"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    return load_config(tmp_path / "cfg.yaml", {"kafka.instance_id": instance})


def test_instances_of_a_consumer_group_on_one_host_keep_their_own_versions(tmp_path):
    """Two instances started from one config (a relative ``versions_dir``) both fine-tune, each in
    ``versions_dir/<group_id>/<instance_id>``, and each restart resumes its own serving version; a second
    process with the same instance id is refused (the directory is locked)."""
    _publish_by_hand(tmp_path / "versions" / "forecasters" / "1", StreamModel(SPEC), 5, {"source": "earlier"})
    zero, one = (
        _service_engine(_service_config(tmp_path, "0")),
        _service_engine(_service_config(tmp_path, "1")),
    )
    try:
        assert zero.finetuner is not None and one.finetuner is not None
        assert zero.finetuner.versions_dir == tmp_path / "versions" / "forecasters" / "0"
        assert one.finetuner.versions_dir == tmp_path / "versions" / "forecasters" / "1"
        assert (zero.model.info.version, one.model.info.version) == (0, 5)  # each resumed its own
        assert one.finetuner.load_version(5).info.trained_on == {"source": "earlier"}
        with pytest.raises(RuntimeError, match=r"finetune\.versions_dir: .*forecasters/0 is in use"):
            _service_engine(_service_config(tmp_path, "0"))
    finally:
        zero.close()
        one.close()


def test_group_and_instance_ids_are_one_directory_level_each(tmp_path):
    """Ids that look like paths stay one level below ``versions_dir`` (reversibly escaped)."""
    for instance, name in [("../..", "..%2F.."), ("..", "%2E%2E"), ("a/b c", "a%2Fb%20c"), ("", "%")]:
        tuned = _finetune_settings(_service_config(tmp_path, instance))
        assert tuned is not None and tuned.versions_dir is not None
        assert Path(tuned.versions_dir) == tmp_path / "versions" / "forecasters" / name
