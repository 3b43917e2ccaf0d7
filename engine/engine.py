"""``Engine``: keeps every stream's hidden state and advances it one timestep per event.

Events from many streams are batched into one fused step per layer:
gather the streams' state rows → ``model.step`` → scatter the new rows back → head → outputs.
``submit`` queues an event for the step loop (its own thread) and returns a future;
``step_many`` runs a batch synchronously on the caller's thread, after the events queued before it.
Both go through ``_run_events``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from engine.batcher import (
    EventFuture,
    EventRun,
    Item,
    Pending,
    PendingQueue,
    join_ids,
    refuse_events,
    split_applied,
)
from engine.errors import (
    EngineClosedError,
    EngineError,
    InvalidInputError,
    PartiallyAppliedError,
    RefusedEndError,
    StreamCapacityError,
    UnknownStreamError,
)
from engine.inputs import check_category, check_category_batch, check_feature_batch, check_features
from engine.runtime import freeze_startup_objects, tune_allocator
from engine.snapshot import EngineSnapshot, state_layout
from engine.spill import SpillStore
from engine.state import (
    PAGE_ROWS,
    Located,
    StateStore,
    StreamId,
    check_stream_id,
    check_stream_ids,
    put_rows,
)
from engine.stats import EngineStats, LatencyWindow
from models.rollout import check_forecastable, check_horizon, rollout
from models.stream_model import StreamModel

if TYPE_CHECKING:
    from engine.finetune import FineTuner, FineTuneSettings
    from engine.replay import ReplayBuffer

EvictionPolicy = Literal["drop", "spill"]


def _as_stream_ids(stream_ids: Sequence[StreamId] | np.ndarray) -> list[StreamId] | np.ndarray:
    """Checked stream ids: an integer array as ``(N,) int64`` (no Python objects), else a list."""
    if (
        isinstance(stream_ids, np.ndarray)
        and stream_ids.ndim == 1
        and stream_ids.dtype.kind in "iu"
        and (stream_ids.dtype != np.uint64 or not len(stream_ids) or stream_ids.max() < 2**63)
    ):
        return stream_ids.astype(np.int64, copy=False)
    ids = stream_ids.tolist() if isinstance(stream_ids, np.ndarray) else list(stream_ids)
    return check_stream_ids(ids)


def _ids_at(stream_ids: list[StreamId] | np.ndarray, events: np.ndarray | None) -> list[StreamId]:
    """The ids of ``events`` (all when None) as a list of Python ids."""
    if isinstance(stream_ids, np.ndarray):
        return (stream_ids if events is None else stream_ids[events]).tolist()
    return list(stream_ids) if events is None else [stream_ids[i] for i in events]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


log = logging.getLogger("engine")
_FLOAT32 = np.dtype(np.float32)


class Engine:
    """Streaming inference for one ``StreamModel``.

    - ``device``: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda:0"``...
    - ``max_batch``: most events in one batch; ``max_delay_ms``: longest a batch waits to fill after its
      first event arrived (0 = take what is queued at once).
    - ``capacity``: initial number of state slots (grows as needed, a page at a time: ``engine.state``).
    - ``ttl_s``: evict streams idle this long; ``eviction``: ``"drop"`` or ``"spill"`` (to ``spill_dir``, a
      cache of this process's live state: never reloaded by another process, see ``engine.spill``).
    - ``max_streams``: most streams held in memory; ``max_state_bytes``: most bytes of state tensors. A new
      stream past either evicts the least recently used stream its batch does not use (drop or spill as
      ``eviction`` says; counted in ``stats().evictions_for_capacity``); with none left, its events are
      refused with ``StreamCapacityError`` (``stats().refused_streams``) and change nothing.
    - ``page_rows``: rows per page of the state store (``engine.state``; small pages are for tests).
    - ``max_pending``: queued events before ``submit`` blocks (backpressure).
    - ``num_threads``: torch intra-op threads (process-wide); default: all cores but one, which keeps a
      core for the submitting threads and connectors (measured: 2 threads on 2 busy cores collapsed
      throughput and made p99 5x worse than 1).
    - ``freeze_gc``: ``gc.freeze()`` once set up, so the collector's full passes stop rescanning the
      model and libraries (they stalled every thread for ~100 ms; see ``engine.runtime``).

    **Per-stream order.** Everything asked of a stream happens in the order the calls were made, whatever
    the entry point: ``submit``/``submit_async``, ``submit_many``/``submit_many_async`` (a batch is one
    queue item) and the controls ``start``/``end``/``reset`` go through one FIFO queue; ``step_many``,
    ``release``, ``restore``, ``snapshot`` and ``state_of`` take the step lock and first apply, on the
    caller's thread, every item queued before them (the step loop pops the queue only under that lock,
    so nothing queued earlier can still be in flight). A call that returned before another began is
    ordered before it; calls racing from different threads are ordered as they take the lock.

    **Failures part-way through a batch.** A batch runs as waves (at most one event per stream each).
    If a wave fails, the waves before it stay applied, nothing is rolled back: each event's result says
    exactly what happened to its state. Applied events succeed and are counted (``events``,
    ``weight_history`` indices) and recorded; the others fail with the error and change nothing.
    ``step_many`` raises ``PartiallyAppliedError`` naming the applied events and their outputs (or the
    error itself when none was applied).
    """

    def __init__(
        self,
        model: StreamModel,
        device: str | torch.device = "auto",
        max_batch: int = 4096,
        max_delay_ms: float = 0.0,
        capacity: int = 1024,
        ttl_s: float | None = None,
        eviction: EvictionPolicy = "drop",
        spill_dir: str | Path | None = None,
        max_pending: int = 100_000,
        sweep_interval_s: float = 1.0,
        freeze_gc: bool = True,
        num_threads: int | None = None,
        max_streams: int | None = None,
        max_state_bytes: int | None = None,
        page_rows: int = PAGE_ROWS,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_streams is not None and max_streams < 1:
            raise ValueError("max_streams must be >= 1 (or None: no limit)")
        if eviction not in ("drop", "spill"):
            raise ValueError(f"eviction must be 'drop' or 'spill', got {eviction!r}")
        tune_allocator()
        torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 2) - 1))
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1e3
        self.sweep_interval_s = sweep_interval_s
        self._spill_tmp: tempfile.TemporaryDirectory[str] | None = None
        spill = self._open_spill(spill_dir) if eviction == "spill" else None
        with torch.no_grad():
            initial = [p.detach().clone() for p in self.model.initial_states]
        self._store = StateStore(
            initial,
            self.device,
            capacity,
            ttl_s,
            spill,
            max_streams=max_streams,
            max_bytes=max_state_bytes,
            page_rows=page_rows,
        )
        self._store.on_drop = self._forget_dropped
        # submit's queue: rows copied into per-run buffers (see engine.batcher). _fast_shape: the shape of a
        # float32 row submit takes without the full check (None for category ids: always checked);
        # _zero_row checks such a row for NaN/Inf in one dot product (a non-finite entry makes it NaN).
        run_rows = min(max_batch, 256)
        if self.model.categorical:
            self._fast_shape: tuple[int, ...] | None = None
            self._queue = PendingQueue(max_pending, (), np.int64, run_rows=run_rows)
        else:
            self._fast_shape = (self.model.feature_size,)
            self._queue = PendingQueue(max_pending, self._fast_shape, np.float32, run_rows=run_rows)
        self._zero_row = np.zeros(self._fast_shape or (), dtype=np.float32)
        self._lock = threading.RLock()
        self._latency = LatencyWindow()
        counters = ("events", "batches", "steps", "errors", "loop_errors", "refused_ends")
        self._counts = dict.fromkeys(counters, 0)
        self._last_sweep = time.monotonic()
        self._closed = False
        self._staging: Tensor | None = None
        self._recorder: ReplayBuffer | None = None
        self._dropped: list[StreamId] | None = None  # ids evicted without spill, once watch_drops is on
        self.finetuner: FineTuner | None = None
        self._weight_history: list[tuple[int, int, float]] = [(self.model.info.version, 0, time.time())]
        if freeze_gc:
            freeze_startup_objects()
        self._thread = threading.Thread(target=self._loop, name="rnnstream-step-loop", daemon=True)
        self._thread.start()

    def _open_spill(self, spill_dir: str | Path | None) -> SpillStore:
        if spill_dir is None:
            self._spill_tmp = tempfile.TemporaryDirectory(prefix="rnnstream-spill-")
            spill_dir = self._spill_tmp.name
        return SpillStore(spill_dir, self.model.state_widths())

    # ---- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Apply every queued event, stop the step loop, release resources. Idempotent."""
        if self._closed:
            return
        if self.finetuner is not None:
            self.finetuner.stop()
        self._closed = True
        self._thread.join()
        with self._lock:  # anything queued after the loop's last look
            self._drain()
        for item in self._queue.close():
            item.future.set_exception(EngineClosedError("the engine closed before this event ran"))
        if self._store.spill is not None:
            self._store.spill.close()
        if self._spill_tmp is not None:
            self._spill_tmp.cleanup()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine is closed; it accepts no more events")

    # ---- event API -----------------------------------------------------------------------------------
    def submit(self, stream_id: StreamId, x: Any) -> Future:
        """Queue one event; the future resolves to its output ``(output_size,) float32`` (numpy).

        ``x``: ``(feature_size,)`` floats, or one integer id for a categorical model. Bad input raises
        ``InvalidInputError`` here, before anything is queued.
        """
        if self._closed:
            raise EngineClosedError("the engine is closed; it accepts no more events")
        if type(stream_id) is not str and type(stream_id) is not int:
            stream_id = check_stream_id(stream_id)
        # Fast path: a float32 numpy row of the right shape, finite (x·0 is 0 unless x holds NaN or Inf);
        # anything else goes through the full check, which converts it or says what is wrong.
        if not (
            type(x) is np.ndarray
            and x.dtype is _FLOAT32
            and x.shape == self._fast_shape
            and x.dot(self._zero_row) == 0
        ):
            x = self._check_one(x, f"event for stream {stream_id!r}")
        future = EventFuture()
        self._queue.put_event(stream_id, x, future, time.monotonic())  # copies x
        return future

    async def submit_async(self, stream_id: StreamId, x: Any) -> np.ndarray:
        """``await`` variant of ``submit``."""
        return await asyncio.wrap_future(self.submit(stream_id, x))

    def submit_many(self, stream_ids: Sequence[StreamId] | np.ndarray, xs: Any) -> Future:
        """Queue ``N`` events as one item; the future resolves to their outputs ``(N, output_size) float32``.

        ``stream_ids``/``xs`` as for ``step_many`` (a stream may repeat; its events apply in order), checked
        the same way before anything is queued: one bad event raises ``InvalidInputError`` naming it.
        The inputs are copied when they could be the caller's memory. The batch goes through the same FIFO
        queue as ``submit`` and the controls (per-stream order, class docstring), and waits while
        ``max_pending`` events are queued, until it fits or the queue is empty (backpressure). The step
        loop steps it with whatever else is queued; a batch larger than ``max_batch`` runs whole.

        Failures, as ``step_many`` raises them, through the future: new streams refused for capacity fail
        the whole batch with ``StreamCapacityError`` naming the refused events (no state changed for any
        of its events: send those elsewhere, submit the rest again); a failure part-way fails it with
        ``PartiallyAppliedError`` naming the applied events and their outputs (or the error itself when
        none was applied).
        """
        self._check_open()
        ids, values = self._check_batch(stream_ids, xs)
        if isinstance(xs, torch.Tensor) or (isinstance(xs, np.ndarray) and np.may_share_memory(values, xs)):
            values = values.copy()  # the caller may reuse its array before the loop runs the batch
        future: Future = Future()
        if len(ids) == 0:
            future.set_result(np.empty((0, self.model.output_size), dtype=np.float32))
            return future
        self._queue.put(EventRun.batch(ids, values, future, time.monotonic()))
        return future

    async def submit_many_async(self, stream_ids: Sequence[StreamId] | np.ndarray, xs: Any) -> np.ndarray:
        """``await`` variant of ``submit_many``: outputs ``(N, output_size) float32``."""
        return await asyncio.wrap_future(self.submit_many(stream_ids, xs))

    def step_many(self, stream_ids: Sequence[StreamId] | np.ndarray, xs: Any) -> np.ndarray:
        """Apply ``N`` events synchronously; returns outputs ``(N, output_size) float32``.

        ``stream_ids``: ``N`` ids (a stream may repeat; its events apply in order);
        ``xs``: ``(N, feature_size)`` floats or ``(N,)`` integer ids. The whole call is checked first:
        one bad event raises ``InvalidInputError`` naming it and no state changes. New streams past
        ``max_streams``/``max_state_bytes`` with nothing left to evict raise ``StreamCapacityError``
        (naming the refused events; no state changes): send those elsewhere and call again without them.
        A failure after some waves were applied raises ``PartiallyAppliedError`` (see the class docstring).
        Events queued by ``submit`` before this call are applied first.
        """
        self._check_open()
        ids, values = self._check_batch(stream_ids, xs)
        with self._lock, torch.no_grad():
            self._drain()
            return self._run_events(ids, self._to_device(values), values).cpu().numpy()

    def _check_batch(
        self, stream_ids: Sequence[StreamId] | np.ndarray, xs: Any
    ) -> tuple[list[StreamId] | np.ndarray, np.ndarray]:
        """Checked ids and inputs of a batch (``InvalidInputError`` naming the first bad event)."""
        ids = _as_stream_ids(stream_ids)
        if self.model.categorical:
            return ids, check_category_batch(xs, len(ids), self.model.spec.num_embeddings)
        return ids, check_feature_batch(xs, len(ids), self.model.feature_size)

    def _check_one(self, x: Any, where: str) -> Any:
        if self.model.categorical:
            return check_category(x, self.model.spec.num_embeddings, where)
        return check_features(x, self.model.feature_size, where)

    # ---- control API ---------------------------------------------------------------------------------
    def start(self, stream_id: StreamId) -> None:
        """Begin (or restart) a stream from the initial state, after its queued events."""
        self._control("start", stream_id).result()

    def reset(self, stream_id: StreamId) -> None:
        """Put a known stream back to the initial state, after its queued events."""
        self._control("reset", stream_id).result()

    def end(self, stream_id: StreamId) -> np.ndarray:
        """Finish a stream after its queued events: returns its final output (``model.end_output``: the
        head on its last hidden state for a plain stack, ``(output_size,)``) and frees its slot. Ends
        queued together run as one batch."""
        return self._control("end", stream_id).result()

    def end_many(self, stream_ids: Sequence[StreamId]) -> list[np.ndarray | EngineError]:
        """``end`` for several distinct streams as one batch (one ``model.end_output`` call), on the
        caller's thread after the items queued before it (as ``step_many``). Returns, aligned with
        ``stream_ids``, each stream's final output ``(output_size,)``, or the error that refused its end
        (``UnknownStreamError``, ``RefusedEndError``): one refusal does not hide the others' outputs."""
        self._check_open()
        ids = check_stream_ids(list(stream_ids))
        if len(set(ids)) != len(ids):
            raise InvalidInputError("end_many takes distinct stream ids")
        now = time.monotonic()
        futures: list[Future] = [Future() for _ in ids]
        items = [Pending("end", sid, None, f, now) for sid, f in zip(ids, futures, strict=True)]
        with self._lock:
            self._drain()
            self._process_safely(items)
        return [f.exception() or f.result() for f in futures]

    def _control(self, op: str, stream_id: StreamId) -> Future:
        self._check_open()
        check_stream_id(stream_id)
        future: Future = Future()
        self._queue.put(Pending(op, stream_id, None, future, time.monotonic()))
        return future

    @property
    def loop_alive(self) -> bool:
        """The step loop is running (False once closed, or if it died)."""
        return self._thread.is_alive()

    # ---- the step loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        """Runs until closed, whatever fails inside: a failure fails the futures it concerns, is counted
        (``loop_errors``) and logged, and the loop goes on."""
        while True:
            ready = self._queue.wait_ready(self.max_batch, self.max_delay_s, idle_timeout_s=0.05)
            if ready:
                with self._lock:  # popped under the lock: see "Per-stream order" in the class docstring
                    self._process_safely(self._queue.pop(self.max_batch))
            elif self._closed:
                return
            try:
                self._maybe_sweep()
            except Exception as exc:  # a spill store or device failure: counted, the loop goes on
                self._loop_failed(exc, [])

    def _drain(self) -> None:
        """Apply every item queued before this call (the caller holds the step lock)."""
        left = len(self._queue)  # events (and controls)
        while left > 0:
            batch = self._queue.pop(min(left, self.max_batch))
            if not batch:
                return
            left -= sum(item.n for item in batch)
            self._process_safely(batch)

    def _process_safely(self, batch: list[Item]) -> None:
        """``_process``, failing the futures it left unresolved if something outside any one event fails."""
        try:
            self._process(batch)
        except Exception as exc:  # a bug or a resource failure outside any one event's control
            self._loop_failed(exc, batch)

    def _loop_failed(self, exc: Exception, batch: list[Item]) -> None:
        self._counts["loop_errors"] += 1
        log.exception("step loop: %s: %s (the loop goes on)", type(exc).__name__, exc)
        for item in batch:
            if isinstance(item, EventRun):
                item.fail(exc)
            elif not item.future.done():
                item.future.set_exception(exc)

    def _process(self, batch: list[Item]) -> None:
        """Run a batch in arrival order: consecutive data events are stepped together, controls in between."""
        with self._lock, torch.no_grad():
            runs: list[EventRun] = []
            ends: list[Pending] = []
            for item in batch:
                if isinstance(item, EventRun):
                    if ends:
                        ends = self._run_ends(ends)
                    runs.append(item)
                    continue
                if runs:
                    self._run_steps(runs)
                    runs = []
                if ends and (item.op != "end" or any(e.stream_id == item.stream_id for e in ends)):
                    ends = self._run_ends(ends)
                if item.op == "end":
                    ends.append(item)  # consecutive ends of distinct streams run as one batch
                else:
                    self._run_control(item)
            if runs:
                self._run_steps(runs)
            if ends:
                self._run_ends(ends)

    def _run_steps(self, runs: list[EventRun]) -> None:
        """Step the queued events of ``runs`` (in order) together; settle every event's future."""
        runs = [r for r in runs if r.n]
        if not runs:
            return
        first = runs[0]
        if len(runs) == 1:
            ids, values = first.ids, first.values[: first.n]
        else:
            ids = join_ids([r.ids for r in runs])
            values = np.concatenate([r.values[: r.n] for r in runs])
        try:
            y = self._run_events(ids, self._to_device(values), values)
            out = (y if y.device.type == "cpu" else y.cpu()).numpy()  # .cpu() would release the GIL
        except StreamCapacityError as exc:  # nothing changed: refuse the new streams, run the others
            self._run_steps(refuse_events(runs, exc))
            return
        except PartiallyAppliedError as exc:  # the applied events succeed, the others fail
            applied, failed, partial = split_applied(runs, exc, self.model.output_size)
            if applied:
                self._resolve(*applied)
            self._fail(failed, exc.__cause__ or exc)
            for run, error in partial:  # submit_many batches with some events applied
                self._counts["errors"] += run.n - len(error.applied)
                run.fail(error)
            return
        except Exception as exc:  # unexpected (device failure, out of memory): nothing was applied
            self._fail(runs, exc)
            return
        self._resolve(runs, out)

    def _resolve(self, runs: list[EventRun], out: np.ndarray) -> None:
        """Give applied events their outputs ``out (events of runs, output_size)``; record their latency."""
        done = time.monotonic()
        times = runs[0].submit_times() if len(runs) == 1 else np.concatenate([r.submit_times() for r in runs])
        self._latency.add(done - times)
        self._counts["batches"] += 1
        lo = 0
        for r in runs:
            r.resolve(out[lo : lo + r.n])
            lo += r.n

    def _fail(self, runs: list[EventRun], exc: BaseException) -> None:
        """Fail events that were not applied."""
        self._counts["errors"] += sum(r.n for r in runs)
        for r in runs:
            r.fail(exc)

    def _run_control(self, item: Pending) -> None:
        try:
            result = None
            if self._recorder is not None:
                self._recorder.forget([item.stream_id])  # its history ends here
            if item.op == "start":
                self._store.reset(item.stream_id)
            elif item.op == "reset":
                self._store.slot(item.stream_id)
                self._store.reset(item.stream_id)
            else:  # "end" runs in batches: _run_ends
                raise ValueError(f"unknown control {item.op!r}")
        except (UnknownStreamError, StreamCapacityError) as exc:  # refusals, not failures
            item.future.set_exception(exc)
            return
        except Exception as exc:  # a spill store or device error: this control fails, nothing else
            self._counts["errors"] += 1
            log.error("control %r of %r failed: %s: %s", item.op, item.stream_id, type(exc).__name__, exc)
            item.future.set_exception(exc)
            return
        item.future.set_result(result)

    def _run_ends(self, items: list[Pending]) -> list[Pending]:
        """End distinct streams together: one ``model.end_output`` over the states of those that exist
        (an utterance model runs its whole-sequence model once for all of them), then free their slots.
        Settles every item's future; returns ``[]`` (the caller's emptied list of pending ends)."""
        known: list[Pending] = []
        rows: list[list[Tensor]] = []
        for item in items:
            if self._recorder is not None:
                self._recorder.forget([item.stream_id])  # its history ends here
            try:  # copied at once: restoring a spilled stream may evict one looked up before it
                rows.append(self._store.gather(np.array([self._store.slot(item.stream_id)])))
                known.append(item)
            except (UnknownStreamError, StreamCapacityError) as exc:  # refusals, not failures
                item.future.set_exception(exc)
        if not known:
            return []
        try:
            state = [torch.cat(parts) for parts in zip(*rows, strict=True)]
            out = self.model.end_output(state).cpu().numpy()
            refusals = self.model.end_refusals(state)
            for item in known:
                self._store.release(item.stream_id)
        except Exception as exc:  # a device error, or the model refusing the states: these ends fail
            self._counts["errors"] += len(known)
            log.error("end of %d streams failed: %s: %s", len(known), type(exc).__name__, exc)
            for item in known:
                item.future.set_exception(exc)
            return []
        for item, row, refusal in zip(known, out, refusals, strict=True):
            if refusal is None:
                item.future.set_result(row)
            else:
                self._counts["refused_ends"] += 1
                item.future.set_exception(RefusedEndError(f"stream {item.stream_id!r}: {refusal}"))
        return []

    def _run_events(self, stream_ids: list[StreamId] | np.ndarray, x: Tensor, host: np.ndarray) -> Tensor:
        """The core: apply events ``x (N, ...)`` of ``stream_ids`` (a list, or ``(N,) int64``) in order;
        returns ``(N, output_size)``.
        ``host``: the same inputs on the CPU (for the fine-tuning recorder).

        Each wave (at most one event per stream) is one fused step: gather → step → scatter; its events
        are counted once it is scattered. A failure after the first wave raises ``PartiallyAppliedError``
        (the waves before it stay applied); one in the first wave raises the error itself.
        """
        store = self._store
        slots = store.slots_for(stream_ids)
        store.touch(slots, time.monotonic())
        waves = store.waves(slots)
        if 1 < len(waves) == len(stream_ids) and self._recorder is None:  # one stream's events in a row
            slot = store.locate(slots[:1])
            ys, state = self.model.steps(x.unsqueeze(1), store.gather(slot))
            store.scatter(slot, state)
            self._counted(len(stream_ids), len(waves))
            return ys[:, 0]
        whole = len(waves) == 1 and not store.paged  # paged: waves are in slot order, not arrival order
        out = None if whole else torch.empty(len(stream_ids), self.model.output_size, device=self.device)
        applied = 0
        try:
            for wave in waves:
                idx = None if whole else torch.from_numpy(wave).to(self.device)
                wave_slots = store.locate(slots if whole else slots[wave])
                state = store.gather(wave_slots)
                y = self._step_wave(x if whole else x.index_select(0, idx), wave_slots, state)
                applied += 1
                self._counted(len(wave), 1)
                if whole:
                    out = y
                else:
                    put_rows(out, idx, y)
                if self._recorder is not None:
                    wave_ids = _ids_at(stream_ids, None if whole else wave)
                    self._recorder.record(wave_ids, host if whole else host[wave], state)
                    self._inline_round()
        except Exception as exc:
            if not applied:
                raise
            done = np.sort(np.concatenate(waves[:applied]))
            raise PartiallyAppliedError(
                f"{len(done)} of {len(stream_ids)} events were applied before {type(exc).__name__}: {exc}",
                done,
                out[torch.from_numpy(done).to(self.device)].cpu().numpy(),
            ) from exc
        return out

    def _counted(self, events: int, steps: int) -> None:
        """Count applied events (``weight_history`` indexes them) and fused steps."""
        self._counts["events"] += events
        self._counts["steps"] += steps

    def _inline_round(self) -> None:
        """``schedule: inline`` fine-tuning: a due round runs here, after a wave, so a weight swap lands
        after the same events in every run (deterministic)."""
        if self.finetuner is not None and self.finetuner.inline:
            self.finetuner.run_due_round()

    def _step_wave(self, x: Tensor, slots: Located, state: list[Tensor]) -> Tensor:
        """One fused step of the streams at ``slots`` from their gathered ``state``; returns outputs."""
        y, new_state = self.model.step(x, state)
        self._store.scatter(slots, new_state)
        return y

    def _to_device(self, values: np.ndarray) -> Tensor:
        """Host array → device tensor; on CUDA through a reused pinned staging buffer."""
        host = torch.from_numpy(values)
        if self.device.type != "cuda":
            return host
        n = host.numel()
        if self._staging is None or self._staging.numel() < n or self._staging.dtype != host.dtype:
            self._staging = torch.empty(max(n, 1 << 16), dtype=host.dtype).pin_memory()
        staged = self._staging[:n].view(host.shape)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if self._store.ttl_s is None or now - self._last_sweep < self.sweep_interval_s:
            return
        self._last_sweep = now
        with self._lock:
            self._evict(now)

    def evict_idle(self) -> int:
        """Evict idle streams now (the loop also does it every ``sweep_interval_s``); returns how many."""
        with self._lock:
            return self._evict(None)

    def _evict(self, now: float | None) -> int:
        return self._store.evict_idle(now)

    def _forget_dropped(self, stream_ids: list[StreamId]) -> None:
        """Streams evicted without spill restart from the initial state: their recorded history ends (and
        a ``watch_drops`` caller hears of them)."""
        if self._recorder is not None:
            self._recorder.forget(stream_ids)
        if self._dropped is not None:
            self._dropped.extend(stream_ids)

    # ---- weights -------------------------------------------------------------------------------------
    def swap_weights(self, state_dict: dict[str, Tensor], version: int) -> None:
        """Load new weights between two steps, atomically; every stream's state is kept.

        On CUDA the host→device copy runs on a side stream while the step loop goes on; only the
        device-to-device load into the live parameters happens under the step lock.
        """
        live = self.model.state_dict(keep_vars=True)
        if set(state_dict) != set(live):
            raise KeyError(f"weights do not match the model: {sorted(set(state_dict) ^ set(live))}")
        if self.device.type == "cuda":
            side = torch.cuda.Stream(self.device)
            with torch.cuda.stream(side):
                staged = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in state_dict.items()}
            side.synchronize()
        else:
            staged = {k: v.to(self.device) for k, v in state_dict.items()}
        pairs = [(live[k], staged[k]) for k in live]
        for dst, src in pairs:
            if dst.shape != src.shape:
                raise ValueError(f"weight shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
        with self._lock, torch.no_grad():  # the swap itself: one copy per tensor between two steps
            for dst, src in pairs:
                dst.copy_(src)
            self.model.info.version = version
            self._weight_history.append((version, self._counts["events"], time.time()))

    def weight_history(self) -> list[tuple[int, int, float]]:
        """Every weight version the engine has served: ``(version, events applied before it, unix time)``,
        oldest first. Event ``k`` (0-based, in the order the engine applied them) ran on the last entry
        whose count is ``<= k``."""
        with self._lock:
            return list(self._weight_history)

    # ---- fine-tuning ---------------------------------------------------------------------------------
    def start_finetuning(self, settings: FineTuneSettings | None = None) -> FineTuner:
        """Record events into a replay buffer and start the background fine-tuning worker."""
        from engine.finetune import FineTuner, FineTuneSettings

        if self.finetuner is not None and not self.finetuner.stopped:
            raise RuntimeError("fine-tuning is already running on this engine (stop it first)")
        if not getattr(self.model, "step_outputs", True):
            raise ValueError(
                "fine-tuning trains on per-step outputs, and this model has none (an utterance model "
                "answers only at a stream's end): train it offline and load the new bundle"
            )
        # A thread holding the GIL makes the step loop wait up to the switch interval (5 ms by default);
        # the fine-tuning coordinator is such a thread: let it be interrupted after 1 ms.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        tuner = FineTuner(self, settings or FineTuneSettings())
        with self._lock:
            self.finetuner, self._recorder = tuner, tuner.buffer
        return tuner

    def stop_recording(self, buffer: ReplayBuffer) -> None:
        """Detach ``buffer`` (a stopped fine-tuner's): events are no longer recorded into it."""
        with self._lock:
            if self._recorder is buffer:
                self._recorder = None

    def feedback(
        self, stream_id: StreamId, label: Any, start: int | None = None, end: int | None = None
    ) -> int:
        """A label for the stream's steps ``[start, end)`` (stream-local step numbers, 0 = its first event
        since fine-tuning started or since its last reset; negative ones count back from now: ``start=-5``
        labels the last 5 steps; default: its latest step), for the fine-tuning worker. ``label``: a class
        id, a target vector, or (``loss: ctc``) a sequence of class ids for the span. Returns the number
        of steps labelled."""
        check_stream_id(stream_id)
        if self.finetuner is None or self._recorder is None:
            raise RuntimeError("feedback needs fine-tuning: call start_finetuning(target='feedback') first")
        if self.finetuner.settings.target != "feedback":
            raise ValueError("this engine fine-tunes on next-step targets; feedback labels are not used")
        value = np.asarray(label)
        if value.dtype.kind not in "iuf" or (value.dtype.kind == "f" and not np.isfinite(value).all()):
            raise InvalidInputError(f"feedback label for stream {stream_id!r} must be finite numbers")
        return self._recorder.feedback(stream_id, value, start, end)

    # ---- snapshots -----------------------------------------------------------------------------------
    def snapshot(
        self, positions: dict[str, Any] | None = None, stream_ids: Sequence[StreamId] | None = None
    ) -> EngineSnapshot:
        """Stream states after every event submitted before this call (queued ones are applied first):
        every stream, or only those of ``stream_ids`` that the engine holds (in memory or spilled).
        ``positions``: source positions to record."""
        with self._lock:
            self._drain()
            ids, states = self._store.export(stream_ids)
            return EngineSnapshot(
                stream_ids=ids,
                states=states,
                model_version=self.model.info.version,
                model_spec=self.model.spec.to_dict(),
                positions=dict(positions or {}),
                layout=state_layout(self.model),  # with any extra state (not derivable from the spec)
            )

    def restore(self, snapshot: EngineSnapshot, replace: bool = True) -> None:
        """Load the snapshot's streams, after the events queued before this call. ``replace=True``
        forgets every other stream; ``False`` merges (for a partition moving in, say), overwriting only the
        snapshot's streams (others may be evicted to make room under ``max_streams``/``max_state_bytes``).
        ``StreamCapacityError`` (nothing changed) if the limits cannot hold the snapshot's streams."""
        snapshot.check_fits(state_layout(self.model))  # SnapshotError naming both layouts
        with self._lock:
            self._drain()
            self._store.import_(snapshot.stream_ids, snapshot.states, time.monotonic(), replace=replace)
            if self._recorder is not None:
                self._recorder.forget(None if replace else snapshot.stream_ids)

    def admit(self, stream_ids: Sequence[StreamId]) -> list[StreamId]:
        """Give every stream of ``stream_ids`` a slot now (a new one starts from the initial state, a
        spilled one gets its state back), evicting under ``max_streams``/``max_state_bytes`` as a step
        would, after the events queued before this call. Returns the streams refused for capacity (no
        state changed for them; the others are admitted). A caller with per-stream bookkeeping of its own
        learns of a refusal this way before touching it, instead of from ``step_many``."""
        ids = check_stream_ids(list(dict.fromkeys(stream_ids)))
        with self._lock:
            self._drain()
            try:
                self._store.slots_for(ids)
                return []
            except StreamCapacityError as exc:
                refused = set(exc.stream_ids)
                self._store.slots_for([s for s in ids if s not in refused])  # the first ones fit
                return list(exc.stream_ids)

    def watch_drops(self) -> None:
        """From now on keep the ids of streams dropped by eviction (TTL or capacity, ``eviction: drop``)
        for ``take_dropped``: a caller that keeps per-stream data of its own must forget them too."""
        with self._lock:
            if self._dropped is None:
                self._dropped = []

    def take_dropped(self) -> list[StreamId]:
        """The streams dropped by eviction since the last call (``watch_drops`` first)."""
        with self._lock:
            if self._dropped is None:
                return []
            dropped, self._dropped = self._dropped, []
            return dropped

    def release(self, stream_ids: Sequence[StreamId]) -> None:
        """Forget streams without output (e.g. their partition moved to another process), after the
        events queued for them before this call."""
        with self._lock:
            self._drain()
            for sid in stream_ids:
                self._store.release(sid)
            if self._recorder is not None:
                self._recorder.forget(stream_ids)

    def state_of(self, stream_id: StreamId) -> list[Tensor]:
        """A copy of one stream's state tensors ``[(width,), ...]`` on CPU, after its queued events."""
        with self._lock:
            self._drain()
            return [t[0].clone().cpu() for t in self._store.rows_at(self._store.slot(stream_id))]

    # ---- one-to-many: forecasts and decoding (models.rollout, models.decoder) -----------------------
    def forecast(self, stream_id: StreamId, horizon: int) -> np.ndarray:
        """The stream's next ``horizon`` outputs ``(horizon, output_size) float32``, each fed back as the
        next input (``models.rollout``), from its state after its queued events; see ``forecast_many``."""
        return self.forecast_many([stream_id], horizon)[0]

    def forecast_many(self, stream_ids: Sequence[StreamId], horizon: int) -> np.ndarray:
        """Rollouts of ``N`` streams as one batch: ``(N, horizon, output_size) float32``, one batched
        ``model.step`` per horizon step. Ordered after the items queued before the call (as ``state_of``);
        read-only: no stream's state, idle time or event count changes, and a spilled stream stays spilled.
        ``UnknownStreamError`` for a stream the engine does not hold; ``NotForecastableError`` for a model
        whose output is not its next input; ``ValueError`` for a horizon outside ``[1, MAX_HORIZON]``."""
        self._check_open()
        check_forecastable(self.model)
        check_horizon(horizon)
        ids = check_stream_ids(list(stream_ids))
        with self._lock, torch.no_grad():
            self._drain()
            if not ids:
                return np.empty((0, horizon, self.model.output_size), dtype=np.float32)
            return rollout(self.model, self._peek_states(ids), horizon).cpu().numpy()

    def decode(self, stream_id: StreamId, max_len: int | None = None) -> np.ndarray:
        """An encoder-decoder model's greedy decoding from the stream's state (the encoder's), after its
        queued events: ``(L, output_size) float32`` (regression) or ``(L,) int64`` tokens without the end
        token (classification), ``L <= max_len`` (default: the decoder's own bound); see ``decode_many``."""
        return self.decode_many([stream_id], max_len)[0]

    def decode_many(self, stream_ids: Sequence[StreamId], max_len: int | None = None) -> list[np.ndarray]:
        """``decode`` for ``N`` streams as one batch (one decoder step per output position), read-only as
        ``forecast_many``. ``ValueError`` if the model has no decoder or ``max_len`` is out of bounds."""
        self._check_open()
        decoder = getattr(self.model, "decoder", None)
        if decoder is None:
            raise ValueError("decode needs an encoder-decoder model (models.decoder.seq2seq_from_torch)")
        length = decoder.check_max_len(max_len)
        ids = check_stream_ids(list(stream_ids))
        with self._lock, torch.no_grad():
            self._drain()
            if not ids:
                return []
            return decoder.decode(self._peek_states(ids), length)

    def _peek_states(self, stream_ids: list[StreamId]) -> list[Tensor]:
        """Copies of the streams' states, one ``(N, width)`` tensor per state tensor on the engine's device,
        rows aligned with ``stream_ids``, read without touching anything: a spilled stream is read from
        the spill store where it stays, no idle time is refreshed. ``UnknownStreamError`` for an unknown one.
        """
        store = self._store
        slots = store.slot_of.lookup(stream_ids)
        if (slots >= 0).all():
            return store.gather(slots)
        found, parts = store.export(stream_ids)
        row_of = {sid: row for row, sid in enumerate(found)}
        unknown = [sid for sid in stream_ids if sid not in row_of]
        if unknown:
            raise UnknownStreamError(f"unknown stream {unknown[0]!r}: it has no state in this engine")
        rows = torch.tensor([row_of[sid] for sid in stream_ids], dtype=torch.int64)
        return [p.index_select(0, rows).to(self.device) for p in parts]

    # ---- introspection -------------------------------------------------------------------------------
    def __contains__(self, stream_id: StreamId) -> bool:
        return stream_id in self._store

    @property
    def limited(self) -> bool:
        """Whether ``max_streams`` or ``max_state_bytes`` is set (only then can a new stream be refused)."""
        return self._store.max_streams is not None or self._store.max_bytes is not None

    @property
    def active_streams(self) -> int:
        return len(self._store)

    def stats(self) -> EngineStats:
        c = self._counts
        p50, p90, p99, pmax = self._latency.percentiles_ms()
        store = self._store
        return EngineStats(
            events=c["events"],
            batches=c["batches"],
            steps=c["steps"],
            mean_batch_size=c["events"] / c["steps"] if c["steps"] else 0.0,
            active_streams=len(store),
            spilled_streams=len(store.spill) if store.spill is not None else 0,
            evictions=store.evictions,
            pending=len(self._queue),
            capacity=store.capacity,
            state_bytes=store.nbytes,
            latency_p50_ms=p50,
            latency_p90_ms=p90,
            latency_p99_ms=p99,
            latency_max_ms=pmax,
            model_version=self.model.info.version,
            device=str(self.device),
            errors=c["errors"],
            loop_errors=c["loop_errors"],
            refused_streams=store.refused_streams,
            refused_ends=c["refused_ends"],
            evictions_for_capacity=store.evictions_for_capacity,
            finetune=self.finetuner.stats().as_dict() if self.finetuner is not None else None,
        )

    def reset_stats(self) -> None:
        """Zero the counters and the latency window (for benchmarks)."""
        with self._lock:
            self._counts = dict.fromkeys(self._counts, 0)
            self._latency.clear()
