"""Online fine-tuning: a background worker trains a copy of the serving model with TBPTT(k1, k2) on the
replay buffer and publishes better weights to the engine, which swaps them in between two steps.

Pieces, in the order data flows:

- ``ReplayBuffer`` (``engine.replay``) records every applied event and cuts chunks (start state, inputs,
  targets); one chunk in ``validation_every`` is held back.
- ``FineTuner`` (this module, a thread in the serving process) runs *rounds*: when enough fresh chunks
  are buffered it asks the worker for one, and executes its decision. It samples nothing itself.
- ``WorkerCore`` (in a child process by default, so training has its own CPU budget and never holds the
  serving process's GIL) maps the replay buffer's chunk store (shared memory, ``engine.replay_store``),
  samples ``updates_per_round`` training batches and the newest held-back batch itself, and keeps three
  weight sets: *serving* (what the engine runs), *previous* (what it ran
  before the last publish) and *candidate* (being trained). A round applies the updates to the candidate,
  then decides:

  - **publish** the candidate when every update was finite, the relative update norm
    ``‖θ_cand − θ_serving‖ / ‖θ_serving‖ ≤ max_update_norm``, and its validation loss is below the serving
    model's by at least ``min_improvement`` (relative);
  - **roll back** a published version while it is on probation (the first ``probation_chunks`` held-back
    chunks that arrived after its publication) if its loss on them is worse than the previous version's
    by more than ``rollback_tolerance``.

- The ``FineTuner`` executes the decision: ``Engine.swap_weights`` (atomic, states kept) and a versioned
  bundle in ``versions_dir`` (``v000003.safetensors``) recording what trained it.

``versions_dir`` belongs to one fine-tuner at a time: it holds an exclusive lock on ``versions_dir/LOCK``
(``flock``, released by ``stop`` or by the kernel when the process dies) and a second one, in this process
or another, is refused naming the key and the holder. A published version file is write-once: a restart
that resumes from it (``serving_bundle``) keeps it, with what trained it, and publishes after it (parent
and update count go on from it); another model under a number already published there is refused. A
relative ``versions_dir`` is made absolute (against the working directory) when the fine-tuner starts.

Next-step targets through a ``regression`` head are the next input in the head's units,
``x[t+1]·scale + offset`` (the head un-standardises; the inputs are standardised).

Loss over the last ``k1`` outputs of each chunk, masked to the steps that have targets:
``mse``: mean over features of ``(y − target)²``; ``cross_entropy``: ``−log p[label]`` (the head's logits
through log-softmax; a ``classifier`` head's probabilities through log). ``ctc``: a span chunk's outputs
over its labelled span against the unaligned label sequence, ``−log Σ_alignments Π p`` (torch's
``ctc_loss``, blank ``ctc_blank``, impossible alignments count 0), from the chunk's start state.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from engine.replay import IGNORE_LABEL, ChunkBatch, ReplayBuffer, sample_store, validation_from_store
from engine.replay_store import ChunkStore
from models.build import build_model
from models.bundle import load_bundle, save_weights
from models.stream_model import ModelInfo, ModelSpec, StreamModel
from models.tbptt import TBPTT, apply_update

if TYPE_CHECKING:
    from engine.engine import Engine

Weights = dict[str, np.ndarray]
SERVING_FILE = "SERVING"
LOCK_FILE = "LOCK"


def serving_bundle(versions_dir: str | Path) -> Path | None:
    """The bundle a fine-tuner in ``versions_dir`` served last (``None`` if there is none): what a
    restarted process should load to go on where it stopped."""
    pointer = Path(versions_dir) / SERVING_FILE
    if not pointer.exists():
        return None
    path = Path(versions_dir) / f"v{int(pointer.read_text().strip()):06d}.safetensors"
    return path if path.exists() else None


class FineTuneSettings(BaseModel):
    """Everything the fine-tuning worker does, as it appears under ``finetune:`` in a config file."""

    model_config = ConfigDict(extra="forbid")

    k1: int = Field(8, ge=1, description="steps between updates; the loss covers a chunk's last k1 outputs")
    k2: int = Field(32, ge=1, description="steps backpropagated through (chunk length)")
    target: Literal["next", "feedback"] = "next"
    loss: Literal["mse", "cross_entropy", "ctc"] = "mse"
    ctc_blank: int = Field(0, ge=0, description="the class id CTC uses as blank")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, description="sgd only")
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine", "exponential"] = "constant"
    lr_schedule_updates: int = Field(10_000, ge=1, description="cosine period / exponential half-life")
    warmup_updates: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1)
    updates_per_round: int = Field(10, ge=1)
    min_train_chunks: int = Field(32, ge=1, description="chunks needed before the first round")
    min_new_chunks: int = Field(8, ge=0, description="fresh chunks needed for another round (idle: no work)")
    validation_every: int = Field(5, ge=2, description="hold back one chunk in this many")
    validation_size: int = Field(256, ge=1, description="most held-back chunks scored per round")
    min_validation_chunks: int = Field(8, ge=1)
    min_improvement: float = Field(0.01, ge=0, description="relative validation gain needed to publish")
    max_update_norm: float = Field(0.5, gt=0, description="largest ‖Δθ‖/‖θ‖ a published candidate may have")
    probation_chunks: int = Field(32, ge=1, description="fresh held-back chunks that judge a new version")
    rollback_tolerance: float = Field(0.1, ge=0, description="how much worse (relative) before rollback")
    history_steps: int = Field(256, ge=2, description="inputs kept per stream (how late feedback may come)")
    max_streams: int = Field(10_000, ge=1)
    max_chunks: int = Field(50_000, ge=1)
    max_chunks_per_stream: int = Field(64, ge=1)
    max_abs_value: float = Field(1e6, gt=0, description="chunks with larger values are quarantined")
    schedule: Literal["background", "inline"] = Field(
        "background",
        description="background: a worker trains beside serving; inline: rounds run in the step loop "
        "between two batches, so the outputs are a deterministic function of the inputs and the seed",
    )
    isolation: Literal["process", "thread"] = "process"
    threads: int = Field(1, ge=1, description="torch threads of the worker")
    priority: Literal["idle", "nice"] = Field(
        "idle", description="idle: SCHED_IDLE, the worker only uses CPU time inference leaves; nice: `nice`"
    )
    nice: int = Field(10, ge=0, le=19, description="worker process niceness when priority is 'nice'")
    start_boost_s: float = Field(
        15.0,
        ge=0,
        description="with priority 'idle': until its first published version, at most this long, the "
        "worker runs at `nice` instead, so a fresh start learns soon even when no CPU is idle; 0: off",
    )
    min_round_interval_s: float = Field(0.0, ge=0)
    versions_dir: str | None = Field(
        None,
        description="where versions are kept (default: a temp dir); one fine-tuner at a time (locked); "
        "relative: against the working directory at start",
    )
    keep_versions: int = Field(1000, ge=2, description="newest versions kept on disk (plus the serving one)")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> FineTuneSettings:
        if self.k1 > self.k2:
            raise ValueError(f"k1 ({self.k1}) must be <= k2 ({self.k2})")
        if self.target == "next" and self.loss != "mse":
            raise ValueError("next-step targets need loss: mse")
        if self.loss == "ctc" and self.target != "feedback":
            raise ValueError("loss: ctc learns from feedback label sequences: set target: feedback")
        return self


# ---- the worker: pure training logic, run in a thread or a child process ----------------------------------
@dataclass
class RoundResult:
    """What one round did and decided."""

    updates: int = 0
    skipped: int = 0
    train_loss: float = float("nan")
    grad_norm: float = float("nan")
    update_norm: float = float("nan")
    val_candidate: float = float("nan")
    val_serving: float = float("nan")
    live_serving: float = float("nan")
    live_previous: float = float("nan")
    decision: Literal["none", "publish", "rollback"] = "none"
    reason: str = ""
    weights: Weights | None = None
    seq_range: list[int] = field(default_factory=list)  # arrival numbers of the chunks trained on
    sample_s: float = 0.0  # seconds the worker spent sampling its batches
    first_update_at: float | None = None  # time.monotonic() of the round's first applied update
    train_s: float = 0.0  # seconds it spent training and deciding


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(dtype).removeprefix("torch."))


def to_numpy_weights(model: torch.nn.Module) -> Weights:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _load(model: torch.nn.Module, weights: Weights) -> None:
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})


def _flat(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class WorkerCore:
    """Serving, previous and candidate weights, the optimiser and its schedule; ``round`` trains and
    decides. All on the CPU."""

    def __init__(self, spec: dict[str, Any], weights: Weights, settings: FineTuneSettings) -> None:
        self.settings = settings
        self.serving = build_model(ModelSpec.from_dict(spec)).eval()
        _load(self.serving, weights)
        self.previous: StreamModel | None = None
        self.candidate = copy.deepcopy(self.serving).train()
        self.tbptt = TBPTT(settings.k1, settings.k2)
        self.updates = 0
        self.rng = np.random.default_rng(settings.seed)
        self._new_optimiser()

    def _new_optimiser(self) -> None:
        s = self.settings
        params = [p for p in self.candidate.parameters() if p.requires_grad]
        if s.optimizer == "sgd":
            self.optimiser: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
            )
        elif s.optimizer == "adamw":
            self.optimiser = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        else:
            self.optimiser = torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimiser, self._lr_factor)

    def _lr_factor(self, update: int) -> float:
        s = self.settings
        update += self.updates  # the schedule continues across rollbacks (which renew the optimiser)
        warm = min(1.0, (update + 1) / s.warmup_updates) if s.warmup_updates else 1.0
        if s.lr_schedule == "cosine":
            phase = (update % s.lr_schedule_updates) / s.lr_schedule_updates
            return warm * 0.5 * (1 + math.cos(math.pi * phase))
        if s.lr_schedule == "exponential":
            return warm * 0.5 ** (update / s.lr_schedule_updates)
        return warm

    # ---- loss ----
    def _loss_fn(self, model: StreamModel, mask: Tensor):
        def loss(outputs: Tensor, targets: Tensor) -> Tensor:
            if self.settings.loss == "mse":
                per_step = (outputs - targets).pow(2).mean(-1)
            else:
                logp = self._log_probs(model, outputs)
                per_step = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            weight = mask.to(per_step.dtype)
            return (per_step * weight).sum() / weight.sum().clamp_min(1.0)

        return loss

    def _tensors(self, batch: ChunkBatch) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        targets = torch.from_numpy(batch.targets)
        head = self.serving.head
        if self.settings.target == "next" and head is not None and head.kind == "regression":
            # The head maps standardised predictions to its units (y·scale + offset); inputs are the
            # standardised values, so the next input in the head's units is x·scale + offset.
            targets = torch.addcmul(head.offset, targets, head.scale)
        if self.settings.loss == "cross_entropy":
            targets = targets.long().masked_fill(~torch.from_numpy(batch.mask), IGNORE_LABEL)
        elif self.settings.loss == "ctc":
            targets = targets.long()
        return (
            [torch.from_numpy(s) for s in batch.start_state],
            torch.from_numpy(batch.xs),
            targets,
            torch.from_numpy(batch.mask),
        )

    def _log_probs(self, model: StreamModel, outputs: Tensor) -> Tensor:
        if model.head is not None and model.head.kind == "classifier":
            return torch.log(outputs.clamp_min(1e-12))
        return torch.log_softmax(outputs, -1)

    def batch_loss(self, model: StreamModel, batch: ChunkBatch) -> Tensor:
        """The loss of ``batch`` under ``model`` (differentiable in its parameters)."""
        state, xs, targets, mask = self._tensors(batch)
        if batch.target_lengths is None:
            loss, _ = self.tbptt.loss(model, state, xs, targets, self._loss_fn(model, mask))
            return loss
        # CTC span chunks: run from each chunk's (detached) start state, keep the labelled span's outputs.
        outputs, _ = model(xs, [s.detach() for s in state])
        logp = self._log_probs(model, outputs)
        spans = [logp[mask[:, b], b] for b in range(logp.shape[1])]
        return torch.nn.functional.ctc_loss(
            torch.nn.utils.rnn.pad_sequence(spans),
            targets,
            input_lengths=mask.sum(0),
            target_lengths=torch.from_numpy(batch.target_lengths),
            blank=self.settings.ctc_blank,
            zero_infinity=True,
        )

    @torch.no_grad()
    def evaluate(self, model: StreamModel, batch: ChunkBatch) -> float:
        return float(self.batch_loss(model, batch))

    # ---- a round ----
    def round(
        self, train: list[ChunkBatch], validation: ChunkBatch | None, live: ChunkBatch | None
    ) -> RoundResult:
        """Apply one update per training batch to the candidate, then publish, roll back, or neither."""
        result = RoundResult()
        judge = self.previous is not None and live is not None and len(live) >= self.settings.probation_chunks
        if judge and self._judge_probation(live, result):  # type: ignore[arg-type]
            return result
        losses, norms = [], []
        for batch in train:
            self.optimiser.zero_grad(set_to_none=True)
            loss_value = self.batch_loss(self.candidate, batch)
            loss, norm = apply_update(self.candidate, self.optimiser, loss_value, self.settings.max_grad_norm)
            if math.isfinite(loss) and math.isfinite(norm):
                if result.first_update_at is None:
                    result.first_update_at = time.monotonic()  # system-wide: comparable across processes
                result.updates += 1
                self.scheduler.step()
                losses.append(loss)
                norms.append(norm)
            else:
                result.skipped += 1
        self.updates += result.updates
        result.train_loss = float(np.mean(losses)) if losses else float("nan")
        result.grad_norm = float(np.mean(norms)) if norms else float("nan")
        self._maybe_publish(validation, result)
        return result

    def sampled_round(self, store: ChunkStore, probation_from_seq: int | None) -> RoundResult:
        """A round on batches this worker samples from the chunk ``store`` itself: ``updates_per_round``
        training batches, the newest held-back chunks, and (a version on probation) the held-back chunks
        that arrived after ``probation_from_seq``."""
        s = self.settings
        started = time.perf_counter()
        train = [sample_store(store, s.batch_size, self.rng) for _ in range(s.updates_per_round)]
        batches = [b for b in train if b is not None]
        validation = validation_from_store(store, s.validation_size)
        live = None
        if probation_from_seq is not None:
            live = validation_from_store(store, s.validation_size, since_seq=probation_from_seq)
        sampled = time.perf_counter()
        result = self.round(batches, validation, live)
        seqs = [seq for b in batches for seq in b.seqs]
        result.seq_range = [min(seqs), max(seqs)] if seqs else []
        result.sample_s, result.train_s = sampled - started, time.perf_counter() - sampled
        return result

    def _judge_probation(self, live: ChunkBatch, result: RoundResult) -> bool:
        """Compare the serving version with the one before on chunks that arrived after its publication;
        roll back if it got worse. Returns True when it rolled back."""
        assert self.previous is not None
        result.live_serving = self.evaluate(self.serving, live)
        result.live_previous = self.evaluate(self.previous, live)
        worse = not math.isfinite(result.live_serving) or (
            result.live_serving > result.live_previous * (1 + self.settings.rollback_tolerance)
        )
        if not worse:
            self.previous = None  # probation passed
            return False
        self.serving.load_state_dict(self.previous.state_dict())
        self.candidate.load_state_dict(self.previous.state_dict())
        self.previous = None
        self._new_optimiser()
        result.decision = "rollback"
        result.reason = f"live loss {result.live_serving:.4g} > previous version's {result.live_previous:.4g}"
        return True

    def _maybe_publish(self, validation: ChunkBatch | None, result: RoundResult) -> None:
        s = self.settings
        if result.updates == 0:
            result.reason = "no finite update"
            return
        if result.skipped:
            result.reason = f"{result.skipped} update(s) had a non-finite loss or gradient"
            return
        serving_norm = float(_flat(self.serving).norm())
        step_norm = float((_flat(self.candidate) - _flat(self.serving)).norm())
        result.update_norm = step_norm / max(serving_norm, 1e-12)
        if not math.isfinite(result.update_norm) or result.update_norm > s.max_update_norm:
            result.reason = f"update norm {result.update_norm:.3g} > {s.max_update_norm}"
            self.candidate.load_state_dict(self.serving.state_dict())  # too far: start again from serving
            self._new_optimiser()
            return
        if validation is None or len(validation) < s.min_validation_chunks:
            result.reason = "not enough validation chunks yet"
            return
        result.val_candidate = self.evaluate(self.candidate, validation)
        result.val_serving = self.evaluate(self.serving, validation)
        if not math.isfinite(result.val_candidate):
            result.reason = "non-finite validation loss"
            return
        if result.val_candidate >= result.val_serving * (1 - s.min_improvement):
            result.reason = f"validation {result.val_candidate:.4g} not better than {result.val_serving:.4g}"
            return
        self.previous = copy.deepcopy(self.serving)
        self.serving.load_state_dict(self.candidate.state_dict())
        result.decision = "publish"
        result.weights = to_numpy_weights(self.serving)


def _lower_priority(settings: FineTuneSettings, boost: bool = False) -> None:
    """Make the worker yield the CPU to inference: ``SCHED_IDLE`` (Linux; runs only on otherwise idle
    CPU time and is preempted at once when a serving thread wakes up), else ``nice``; ``boost``: ``nice``
    for now (a share of a busy CPU; ``SCHED_IDLE`` follows with a second call)."""
    if boost:
        if settings.nice and hasattr(os, "nice"):
            os.nice(settings.nice)
        return
    if settings.priority == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            pass
    if settings.nice and hasattr(os, "nice"):
        os.nice(settings.nice)


class _NoDynamo(types.ModuleType):
    """A stand-in for ``torch._dynamo`` in the worker process. torch's optimisers only call its
    ``graph_break`` and ``disable`` (both no-ops when nothing is compiled), yet importing it costs 1.5-3 s
    of CPU, which would be most of the time to the first update."""

    def __init__(self) -> None:
        super().__init__("torch._dynamo")

    @staticmethod
    def graph_break() -> None:
        pass

    @staticmethod
    def disable(fn: Any = None, recursive: bool = True, wrapping: bool = True) -> Any:
        return fn if fn is not None else (lambda f: f)


def _without_dynamo(settings: FineTuneSettings) -> None:
    """Let torch's optimisers run without importing ``torch._dynamo`` (this process never compiles), if a
    trial step of ``settings.optimizer`` works so; otherwise leave the real one to be imported."""
    if "torch._dynamo" in sys.modules:
        return
    stub = _NoDynamo()
    sys.modules["torch._dynamo"] = stub
    torch._dynamo = stub  # type: ignore[attr-defined]
    try:
        param = torch.nn.Parameter(torch.zeros(2))
        cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}.get(settings.optimizer, torch.optim.Adam)
        optimiser = cls([param], lr=1e-3)
        torch.optim.lr_scheduler.LambdaLR(optimiser, lambda _: 1.0)
        param.grad = torch.ones(2)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    except Exception:  # this torch needs more of it: the real module
        del sys.modules["torch._dynamo"]
        del torch._dynamo  # type: ignore[attr-defined]


def _worker_process_main(fd: int) -> None:
    """The child process (``python -m engine.finetune FD``): receive the model and settings, then answer
    rounds until told to stop. It starts at the priority it was spawned with (start-up is short and on
    the way to the first update) and lowers it once ready."""
    conn = Connection(fd)
    spec, weights, settings, layout, store_fd = conn.recv()
    parsed = FineTuneSettings(**settings)
    torch.set_num_threads(parsed.threads)
    _without_dynamo(parsed)
    core = WorkerCore(spec, weights, parsed)
    store = ChunkStore.attach(layout, store_fd)
    boost = parsed.priority == "idle" and parsed.start_boost_s > 0
    boost_until = time.monotonic() + parsed.start_boost_s
    _lower_priority(parsed, boost=boost)
    conn.send(("ready", None))
    while True:
        try:
            kind, payload = conn.recv()
        except EOFError:  # the serving process is gone
            kind = "stop"
        if kind == "stop":
            conn.close()
            # Skip interpreter teardown: torch's optimisers import triton, whose bindings print pages of
            # "leaked" warnings at a normal exit. Nothing is left to flush.
            os._exit(0)
        try:
            result = core.sampled_round(store, *payload)
            conn.send(("result", result))
        except Exception:  # report, keep serving
            conn.send(("error", traceback.format_exc()))
            continue
        if boost and (result.decision == "publish" or time.monotonic() > boost_until):
            _lower_priority(parsed)  # the start is over: idle priority from now on
            boost = False


class _ThreadWorker:
    """The worker in this process (``isolation: thread`` or ``schedule: inline``), on the same store."""

    def __init__(
        self, spec: dict[str, Any], weights: Weights, settings: FineTuneSettings, store: ChunkStore
    ) -> None:
        self.core = WorkerCore(spec, weights, settings)
        self.store = store

    def round(self, probation_from_seq: int | None) -> RoundResult:
        return self.core.sampled_round(self.store, probation_from_seq)

    def close(self) -> None:
        pass


class _ProcessWorker:
    """The worker in a child interpreter, ``python -m engine.finetune FD``, talking over a socket pair.

    A plain subprocess rather than ``multiprocessing``'s spawn: spawn re-imports the parent's
    ``__main__``, which re-runs any user script that lacks an ``if __name__ == "__main__"`` guard.
    """

    def __init__(
        self, spec: dict[str, Any], weights: Weights, settings: FineTuneSettings, store: ChunkStore
    ) -> None:
        parent, child = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.finetune", str(child.fileno())],
            pass_fds=(child.fileno(), store.fd),  # the chunk store: the worker maps the same pages
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send((spec, weights, settings.model_dump(), store.layout, store.fd))
        if not self.conn.poll(120):
            raise RuntimeError("the fine-tuning worker did not start within 120 s")
        kind, _ = self.conn.recv()
        if kind != "ready":
            raise RuntimeError(f"the fine-tuning worker did not start: {kind}")

    def round(self, probation_from_seq: int | None) -> RoundResult:
        self.conn.send(("round", (probation_from_seq,)))
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"fine-tuning worker failed:\n{value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(("stop", None))
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


# ---- the coordinator: a thread in the serving process ---------------------------------------------------
def _lock_versions_dir(versions_dir: Path) -> BinaryIO:
    """Create ``versions_dir`` and take its exclusive lock (``LOCK``, holding this process's pid and host);
    returns the open file that holds it (closing it, or its collection, releases the lock). Raises
    ``RuntimeError`` naming the holder when another open file holds it, in this process or another."""
    versions_dir.mkdir(parents=True, exist_ok=True)
    lock = os.fdopen(os.open(versions_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)
    fd = lock.fileno()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "an unknown process"
        lock.close()
        raise RuntimeError(
            f"finetune.versions_dir: {versions_dir} is in use by another fine-tuner ({holder}); each "
            "instance needs its own directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return lock


@dataclass
class FineTuneStats:
    """Progress of the fine-tuning worker (``Engine.stats().finetune``)."""

    state: str = "starting"
    rounds: int = 0
    updates: int = 0
    skipped_updates: int = 0
    published: int = 0
    rolled_back: int = 0
    serving_version: int = 0
    train_loss: float = float("nan")
    val_loss_serving: float = float("nan")
    val_loss_candidate: float = float("nan")
    last_decision: str = ""
    last_error: str = ""
    updates_per_s: float = 0.0
    first_update_s: float | None = None  # seconds from the start to the first update / published version
    first_version_s: float | None = None
    record_s: float = 0.0  # serving-side costs: seconds the step loop spent recording events,
    coordinator_cpu_s: float = 0.0  # and CPU seconds of the coordinator thread (rounds, swaps, versions)
    worker_train_s: float = 0.0  # seconds the worker spent training and deciding, and sampling
    worker_sample_s: float = 0.0
    buffer: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FineTuner:
    """Runs the fine-tuning rounds for ``engine``; see the module docstring. Start it with
    ``Engine.start_finetuning(settings)``; ``pause``/``resume``/``stop`` at any time."""

    def __init__(self, engine: Engine, settings: FineTuneSettings) -> None:
        model = engine.model
        if settings.target == "next" and model.output_size != model.feature_size:
            raise ValueError(
                f"next-step targets need the model's output ({model.output_size}) to predict its input "
                f"({model.feature_size} features)"
            )
        if model.categorical and settings.target == "next":
            raise ValueError("next-step targets need a feature model, not a categorical one")
        self.engine = engine
        self.settings = settings
        self.buffer = ReplayBuffer(
            settings.k1,
            settings.k2,
            () if model.categorical else (model.feature_size,),
            target=settings.target,
            history_steps=settings.history_steps,
            max_streams=settings.max_streams,
            max_chunks=settings.max_chunks,
            max_chunks_per_stream=settings.max_chunks_per_stream,
            validation_every=settings.validation_every,
            max_abs_value=settings.max_abs_value,
            input_dtype=np.int64 if model.categorical else np.float32,
            sequence_labels=settings.loss == "ctc",
            state_widths=model.state_widths(),
            state_dtype=_numpy_dtype(next(model.parameters()).dtype),
            target_shape=() if settings.loss == "cross_entropy" else (model.output_size,),
            target_dtype=np.int64 if settings.loss == "cross_entropy" else np.float32,
        )
        self.buffer.open_store()  # before the worker starts: it maps the store
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if settings.versions_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rnnstream-versions-")
        self.versions_dir = Path(settings.versions_dir or self._tmp.name).absolute()  # type: ignore[union-attr]
        self._lock: BinaryIO | None = _lock_versions_dir(self.versions_dir)
        self._spec = model.spec.to_dict()
        self._serving_version = model.info.version
        self._previous_version: int | None = None
        self._kept = self.versions()
        self._next_version = max([model.info.version, *self._kept]) + 1
        self._updates_before = 0  # updates that trained the serving version before this fine-tuner
        try:
            self._keep_serving(model)
        except BaseException:
            self._unlock()
            raise
        self._stats = FineTuneStats(serving_version=model.info.version)
        self._running = threading.Event()
        self._running.set()
        self._stopped = threading.Event()
        self._between_rounds = threading.Event()  # clear while a round runs (``pause`` waits for it)
        self._between_rounds.set()
        self._probation_from_seq: int | None = None
        self._last_round_seq = -(10**9)
        self._started = time.monotonic()
        self._worker: _ThreadWorker | _ProcessWorker | None = None
        self._thread = threading.Thread(target=self._loop, name="rnnstream-finetune", daemon=True)
        if settings.schedule == "inline":
            self._worker = _ThreadWorker(self._spec, to_numpy_weights(model), settings, self._store())
            self._stats.state = "running"
        else:
            self._thread.start()

    # ---- control ----
    def pause(self, timeout_s: float = 120.0) -> None:
        """Train no more until ``resume`` (events are still recorded); returns once a round in flight has
        finished (or after ``timeout_s``), so nothing is published after this returns."""
        self._running.clear()
        self._stats.state = "paused"
        if threading.current_thread() is not self._thread:
            self._between_rounds.wait(timeout_s)

    def resume(self) -> None:
        self._running.set()
        if self._stats.state == "paused":
            self._stats.state = "running"

    def stop(self) -> None:
        """Stop training for good (the serving weights stay as they are). Idempotent."""
        self._stopped.set()
        self._running.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        if self.inline and self._worker is not None:
            self._worker.close()
        self.engine.stop_recording(self.buffer)  # no recording cost once stopped
        self._unlock()  # nothing is written any more: another fine-tuner may take the directory
        self._stats.state = "stopped"

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def inline(self) -> bool:
        return self.settings.schedule == "inline"

    def run_due_round(self) -> None:
        """``schedule: inline``: one round now if enough fresh chunks are buffered (called by the engine's
        step loop after a batch, so a swap lands between two batches at a point fixed by the input)."""
        if not self._begin_round():
            return
        try:
            with torch.inference_mode(False), torch.enable_grad():  # the step loop runs without autograd
                self._round()
        except Exception as exc:  # training failed: serving goes on with the current weights
            self._stopped.set()
            self._stats.state = "failed"
            self._stats.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._between_rounds.set()

    def _begin_round(self) -> bool:
        """Mark a round as running, unless paused or stopped (checked after the mark, so a ``pause``
        either prevents the round or waits for its end)."""
        self._between_rounds.clear()
        if self._running.is_set() and not self._stopped.is_set():
            return True
        self._between_rounds.set()
        return False

    def stats(self) -> FineTuneStats:
        self._stats.buffer = self.buffer.stats()
        self._stats.record_s = self.buffer.record_s
        elapsed = time.monotonic() - self._started
        self._stats.updates_per_s = self._stats.updates / elapsed if elapsed > 0 else 0.0
        return copy.copy(self._stats)

    # ---- versions ----
    def versions(self) -> list[int]:
        """Version numbers kept in ``versions_dir``, ascending."""
        return sorted(int(p.stem[1:]) for p in self.versions_dir.glob("v*.safetensors"))

    def version_path(self, version: int) -> Path:
        return self.versions_dir / f"v{version:06d}.safetensors"

    def load_version(self, version: int) -> StreamModel:
        """A kept version as a model (CPU, eval mode)."""
        return load_bundle(self.version_path(version))

    def _mark_serving(self, version: int) -> None:
        """Record which version serves now (``versions_dir/SERVING``), for a restarted process."""
        pointer = self.versions_dir / SERVING_FILE
        tmp = pointer.with_suffix(".tmp")
        tmp.write_text(f"{version}\n")
        tmp.replace(pointer)

    def _unlock(self) -> None:
        """Release ``versions_dir`` (idempotent)."""
        if self._lock is not None:
            self._lock.close()  # closing the only descriptor drops the flock
            self._lock = None

    def _keep_serving(self, model: StreamModel) -> None:
        """Keep the serving model as its version: a new file recording what trained it (its bundle's own
        ``trained_on``), or, on a resume, the published file as it is. Other weights under a published
        number are refused: that file is another model's."""
        version, path = model.info.version, self.version_path(model.info.version)
        if not path.exists():
            self._save_version(
                model.state_dict(), version, dict(model.info.trained_on) or {"source": "initial"}
            )
            return
        bundle = load_bundle(path)
        self._updates_before = int(bundle.info.trained_on.get("updates_total", 0))  # the count goes on
        published = bundle.state_dict()
        live = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if published.keys() != live.keys() or not all(torch.equal(published[k], live[k]) for k in live):
            raise ValueError(
                f"finetune.versions_dir: {path} holds other weights than the served model (version "
                f"{version}); published versions are never rewritten: start from that directory's serving "
                "bundle or give this model its own versions_dir"
            )

    def _save_version(self, weights: dict[str, Tensor], version: int, trained_on: dict[str, Any]) -> None:
        """Publish ``version``: write-once (the directory is locked, so nobody else writes meanwhile)."""
        path = self.version_path(version)
        if path.exists():
            raise FileExistsError(f"{path}: version {version} is published already and is never rewritten")
        info = ModelInfo(
            version=version, features=dict(self.engine.model.info.features), trained_on=trained_on
        )
        save_weights(ModelSpec.from_dict(self._spec), info, weights, self.version_path(version))
        if version not in self._kept:
            self._kept.append(version)
        while len(self._kept) > self.settings.keep_versions:
            old = next(v for v in self._kept if v not in (self._serving_version, self._previous_version))
            self._kept.remove(old)
            self.version_path(old).unlink(missing_ok=True)

    # ---- the loop ----
    def _loop(self) -> None:
        try:
            weights = to_numpy_weights(self.engine.model)
            worker_cls = _ProcessWorker if self.settings.isolation == "process" else _ThreadWorker
            self._worker = worker_cls(self._spec, weights, self.settings, self._store())
            self._stats.state = "running" if self._running.is_set() else "paused"
            while not self._stopped.is_set():
                self._running.wait()
                if self._stopped.is_set():
                    break
                if not self._begin_round():
                    continue
                started = time.monotonic()
                cpu = time.thread_time()
                try:
                    trained = self._round()
                finally:
                    self._between_rounds.set()
                    self._stats.coordinator_cpu_s += time.thread_time() - cpu
                if not trained:
                    self._stopped.wait(0.05)  # not enough data yet
                rest = self.settings.min_round_interval_s - (time.monotonic() - started)
                if rest > 0:
                    self._stopped.wait(rest)
        except Exception as exc:  # the worker died: serving goes on with the current weights
            self._stats.state = "failed"
            self._stats.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            if self._worker is not None:
                self._worker.close()  # a default (temporary) versions_dir stays readable until GC

    def _store(self) -> ChunkStore:
        store = self.buffer.store
        if store is None:
            raise RuntimeError("the replay buffer's chunk store is not open")
        return store

    def _round(self) -> bool:
        """Ask the worker for a round if enough (fresh) chunks are buffered; execute its decision."""
        s = self.settings
        first_seq = self.buffer.next_seq
        if len(self.buffer) < s.min_train_chunks or first_seq - self._last_round_seq < s.min_new_chunks:
            return False
        self._last_round_seq = first_seq
        assert self._worker is not None
        result = self._worker.round(self._probation_from_seq)
        self._apply(result, first_seq)
        return True

    def _apply(
        self, result: RoundResult, first_seq: int, train: list[ChunkBatch | None] | None = None
    ) -> None:
        st = self._stats
        st.rounds += 1
        st.worker_train_s += result.train_s
        st.worker_sample_s += result.sample_s
        if result.updates and st.first_update_s is None:
            st.first_update_s = (result.first_update_at or time.monotonic()) - self._started
        st.updates += result.updates
        st.skipped_updates += result.skipped
        st.train_loss = result.train_loss
        if math.isfinite(result.val_serving):
            st.val_loss_serving, st.val_loss_candidate = result.val_serving, result.val_candidate
        if result.decision == "publish" and result.weights is not None:
            version = self._next_version
            self._next_version += 1
            weights = {k: torch.from_numpy(v) for k, v in result.weights.items()}
            seqs = result.seq_range or [seq for b in train or [] if b is not None for seq in b.seqs]
            self.engine.swap_weights(weights, version)  # serve first, then write the bundle
            self._save_version(
                weights,
                version,
                {
                    "source": "online fine-tuning",
                    "parent_version": self._serving_version,
                    "updates_total": self._updates_before + st.updates,
                    "chunks_seq_range": [min(seqs), max(seqs)] if seqs else [],
                    "val_loss": result.val_candidate,
                    "val_loss_parent": result.val_serving,
                    "published_at": time.time(),
                },
            )
            self._mark_serving(version)
            self._previous_version, self._serving_version = self._serving_version, version
            self._probation_from_seq = self.buffer.next_seq - 1  # judged on chunks cut from now on
            st.published += 1
            if st.first_version_s is None:
                st.first_version_s = time.monotonic() - self._started
            st.last_decision = f"published v{version}"
        elif result.decision == "rollback" and self._previous_version is not None:
            back = self._previous_version
            weights = self.load_version(back).state_dict()
            self.engine.swap_weights(weights, back)
            self._mark_serving(back)
            st.rolled_back += 1
            st.last_decision = f"rolled back v{self._serving_version} → v{back}: {result.reason}"
            self._serving_version, self._previous_version = back, None
            self._probation_from_seq = None
        else:
            if self._probation_from_seq is not None and math.isfinite(result.live_serving):
                self._probation_from_seq = None  # probation judged and passed
            st.last_decision = result.reason
        st.serving_version = self._serving_version


if __name__ == "__main__":
    # Run through the package module, not this ``__main__`` copy, so results pickle as engine.finetune.*.
    from engine.finetune import _worker_process_main as main

    main(int(sys.argv[1]))
