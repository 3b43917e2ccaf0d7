"""Shared test helpers: random torch reference models and their whole-sequence outputs."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from models import StreamModel, from_torch

# torch's optimisers import torch._dynamo, which imports triton if it is installed (the CUDA wheels bring
# it); triton's bindings then print pages of "nanobind: leaked ..." at interpreter exit, after pytest's
# summary. Nothing here uses triton: make it unimportable on machines without CUDA.
if not torch.cuda.is_available():
    sys.modules.setdefault("triton", None)  # type: ignore[arg-type]

TORCH_CLASSES = {"rnn_tanh": nn.RNN, "rnn_relu": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class Reference:
    """A plain torch model (optional embedding → recurrent module → optional linear head) and the
    ``StreamModel`` imported from it."""

    module: nn.Module
    embedding: nn.Embedding | None
    head: nn.Linear | None
    head_kind: str
    model: StreamModel

    def run(self, seq: np.ndarray) -> np.ndarray:
        """One stream's whole sequence through the torch modules: ``(T, F)`` or ``(T,)`` → ``(T, out)``."""
        with torch.no_grad():
            x = torch.as_tensor(seq)
            if self.embedding is not None:
                x = self.embedding(x)
            batch_first = getattr(self.module, "batch_first", False)
            out, _ = self.module(x.unsqueeze(0) if batch_first else x.unsqueeze(1))
            out = out[0] if batch_first else out[:, 0]
            if self.head is not None:
                out = self.head(out)
                if self.head_kind == "classifier":
                    out = torch.softmax(out, dim=-1)
            return out.numpy()

    def random_inputs(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """A random input sequence: ``(T, input_size) float32`` or ``(T,) int64`` ids."""
        if self.embedding is not None:
            return rng.integers(0, self.embedding.num_embeddings, size=length)
        return rng.standard_normal((length, self.module.input_size)).astype(np.float32)


def make_reference(
    kind: str = "lstm",
    input_size: int = 4,
    hidden_size: int = 8,
    num_layers: int = 1,
    bias: bool = True,
    batch_first: bool = False,
    proj_size: int = 0,
    num_embeddings: int = 0,
    head_out: int = 0,
    head_kind: str = "linear",
    seed: int = 0,
) -> Reference:
    torch.manual_seed(seed)
    kwargs: dict = {"num_layers": num_layers, "bias": bias, "batch_first": batch_first}
    if kind.startswith("rnn"):
        kwargs["nonlinearity"] = kind.split("_")[1]
    if proj_size:
        kwargs["proj_size"] = proj_size
    module = TORCH_CLASSES[kind](input_size, hidden_size, **kwargs).eval()
    embedding = nn.Embedding(num_embeddings, input_size) if num_embeddings else None
    out_width = proj_size or hidden_size
    head = nn.Linear(out_width, head_out) if head_out else None
    model = from_torch(module, head, head_kind=head_kind, embedding=embedding)
    return Reference(module, embedding, head, head_kind, model)


@pytest.fixture
def reference() -> Reference:
    return make_reference("lstm", input_size=3, hidden_size=8, num_layers=2, head_out=2)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def ref_factory():
    """``make_reference`` as a fixture (test modules are imported without the tests folder on sys.path)."""
    return make_reference


def _start_mqtt_broker_or_skip(base_dir):
    """``start_broker`` in ``base_dir``; a broker that cannot start skips the test (fails under CI=true)."""
    from rnnstream.mqtt_broker import MqttBrokerError, start_broker

    try:
        return start_broker(base_dir)
    except MqttBrokerError as exc:
        if in_ci():
            pytest.fail(f"cannot start the local MQTT broker (CI=true: must not skip): {exc}")
        pytest.skip(f"cannot start the local MQTT broker: {exc}")


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory):
    """A local Mosquitto (``rnnstream.mqtt_broker.Broker``) shared by the session; do not kill it."""
    broker = _start_mqtt_broker_or_skip(tmp_path_factory.mktemp("mqtt"))
    yield broker
    broker.stop()


@pytest.fixture
def fresh_mqtt_broker(tmp_path):
    """A local Mosquitto of the test's own, free to ``kill()`` / ``restart()``; stopped afterwards."""
    broker = _start_mqtt_broker_or_skip(tmp_path / "mqtt")
    yield broker
    broker.stop()


# ---- the Kafka broker (tests/connectors, tests/rnnstream) ------------------------------------------------
def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: integration tests must run, not skip)")
    pytest.skip(reason)


def start_kafka(brokers: int, base_dir):
    """A local KRaft cluster of ``brokers`` brokers (``rnnstream.kafka_broker``), or skip/fail."""
    import shutil

    from rnnstream import kafka_broker as kb

    if shutil.which("java") is None:
        _unavailable("java not found: the Kafka broker needs a JDK 17+ (scripts/system_deps.sh installs it)")
    try:
        kb.ensure_jars()
        return kb.start_cluster(brokers, base_dir=base_dir)
    except kb.KafkaBrokerError as exc:
        _unavailable(f"the Kafka broker could not start: {exc}")
        raise


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory):
    cluster = start_kafka(1, tmp_path_factory.mktemp("kafka"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def kafka_starter():
    """``start_kafka`` for tests that start clusters of their own (test modules cannot import conftests)."""
    return start_kafka


def _assert_docs_close(got: list[dict], want: list[dict], tol: float = 1e-5) -> None:
    """Output documents equal but for float32 rounding (kernels round differently for other batch
    sizes): floats to ``tol`` (relative and absolute), at any depth; everything else exactly."""
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        _assert_close(mine, theirs, tol, where=repr(theirs)[:300])


def _assert_close(mine: object, theirs: object, tol: float, where: str) -> None:
    if isinstance(theirs, float) and isinstance(mine, float):
        assert mine == pytest.approx(theirs, rel=tol, abs=tol), where
    elif isinstance(theirs, dict) and isinstance(mine, dict):
        assert mine.keys() == theirs.keys(), where
        for key in theirs:
            _assert_close(mine[key], theirs[key], tol, where)
    elif isinstance(theirs, list) and isinstance(mine, list):
        assert len(mine) == len(theirs), where
        for a, b in zip(mine, theirs, strict=True):
            _assert_close(a, b, tol, where)
    else:
        assert mine == theirs, where


@pytest.fixture(scope="session")
def docs_close():
    """``_assert_docs_close`` for test modules."""
    return _assert_docs_close


# ---- the headless audio device (rnnstream.pulseaudio) ----------------------------------------------------
@pytest.fixture(scope="session")
def audio_server(tmp_path_factory):
    """The PulseAudio null-sink server (``rnnstream.pulseaudio.AudioServer``, 48 kHz), its env in
    ``os.environ``: import sounddevice only after this fixture. Reuses a running 48 kHz ``rnnstream audio
    up`` server (left running); otherwise starts one in a run dir of the session's own (exported as
    ``RNNSTREAM_AUDIO_RUN_DIR`` so ``status()`` finds it, also in subprocesses; another test session or
    ``rnnstream audio down`` cannot stop it) and stops it at the end."""
    from rnnstream import pulseaudio as pa

    running = pa.status()
    started_here = running is None or running.rate != 48000
    with pytest.MonkeyPatch.context() as mp:
        if started_here:
            mp.setenv(pa.RUN_DIR_ENV, str(tmp_path_factory.mktemp("audio")))
        try:
            server = pa.up(48000)
        except pa.AudioServerError as exc:
            _unavailable(f"cannot start the PulseAudio null-sink server: {exc}")
            raise
        pa.use_server(server)
        yield server
        if started_here:
            pa.down()
