"""``rnnstream run``: consume input topics → decode → engine → produce outputs, with checkpointed state.

One thread runs the loop ``poll → process → (every interval) checkpoint``:

- *process*: each polled record is decoded; bad ones go to the dead-letter topic; good ones are stepped
  through the engine in batches (``Engine.step_many``), their outputs produced to the output topic.
- *checkpoint*: the states of streams that changed since the last checkpoint go to the changelog topic,
  the consumed offsets are added with ``send_offsets_to_transaction``, and the Kafka transaction holding
  all of it (outputs and dead letters too) commits. A crash aborts the open transaction: the committed
  state and offsets still agree, the restarted service restores that state and replays from those
  offsets, so no event is lost or applied twice. Outputs are exactly-once for ``read_committed``
  consumers; ``read_uncommitted`` consumers may see replayed duplicates, which carry the same
  ``topic/partition/offset`` for de-duplication.
- *rebalance*: partitions are a unit of state ("task" ``p`` = partition ``p`` of every input topic).
  Before partitions are revoked the open transaction commits; newly assigned partitions have their
  streams restored from the changelog before any of their events is processed.

Backpressure: the loop is synchronous; when the producer's buffer is full ``send`` blocks, so polling
(and with it consumption) pauses instead of memory growing.

Fine-tuning (``finetune:`` in the config): the engine's background worker learns from the events it
serves; labels come inline (``"label"`` in an input message, for that message's timesteps) or from the
``feedback_topic`` (co-partitioned with the inputs, keyed by stream id; ``connectors.codec.Feedback``).
Published versions go to ``finetune.versions_dir``; a restarted process loads the one it served last.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from itertools import chain

import numpy as np
import torch

from connectors import kafka as kc
from connectors.codec import Decoded, DecodeError, Decoder, check_label, decode_feedback, encode_output
from engine import Engine, EngineSnapshot, UnknownStreamError
from engine.finetune import serving_bundle
from engine.runtime import freeze_startup_objects
from models import load_bundle
from rnnstream.admin import AdminServer
from rnnstream.config import ServiceConfig

log = logging.getLogger("rnnstream.kafka")


@dataclass
class ServiceCounters:
    messages: int = 0
    events: int = 0
    dead_letters: int = 0
    outputs: int = 0
    checkpoints: int = 0
    restored_streams: int = 0
    rebalances: int = 0
    aborts: int = 0
    labels: int = 0  # feedback labels applied (inline or from the feedback topic)
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Batch:
    """Data messages waiting to be stepped together. ``chunks`` holds each message's timesteps (a list of
    rows from JSON/msgpack, an array from float32 frames); ``ids`` the stream id once per timestep."""

    ids: list[str] = field(default_factory=list)
    chunks: list[list | np.ndarray] = field(default_factory=list)
    records: list[tuple[kc.Record, str, int]] = field(default_factory=list)  # (record, stream, timesteps)

    def add(self, record: kc.Record, sid: str, xs: list | np.ndarray) -> None:
        n = len(xs)
        if n == 1:
            self.ids.append(sid)
        else:
            self.ids.extend([sid] * n)
        self.chunks.append(xs)
        self.records.append((record, sid, n))

    def inputs(self, dtype: type) -> np.ndarray:
        """All timesteps stacked: ``(N, F) float32`` (or ``(N,) int64`` ids)."""
        if all(type(c) is list for c in self.chunks):
            return np.array(list(chain.from_iterable(self.chunks)), dtype=dtype)
        return np.concatenate([np.asarray(c, dtype=dtype) for c in self.chunks])

    def __bool__(self) -> bool:
        return bool(self.records)


class KafkaService:
    """The long-running Kafka service. ``run()`` blocks until ``stop()`` (or SIGTERM/SIGINT)."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        kcfg = config.kafka
        self.instance_id = kcfg.instance_id
        ft = config.finetune
        resumed = serving_bundle(ft.versions_dir) if ft is not None and ft.versions_dir else None
        model = load_bundle(resumed or config.model)
        if resumed is not None:
            log.info("fine-tuning: resuming with %s (version %d)", resumed.name, model.info.version)
        e = config.engine
        self.engine = Engine(
            model,
            device=e.device,
            max_batch=e.max_batch,
            max_delay_ms=e.max_delay_ms,
            capacity=e.capacity,
            ttl_s=e.ttl_s,
            eviction=e.eviction,
            spill_dir=e.spill_dir,
        )
        self.decoder = Decoder(
            kcfg.encoding, model.feature_size, model.spec.num_embeddings, kcfg.max_timesteps_per_message
        )
        settings = kc.ClientSettings(
            kcfg.bootstrap_servers,
            kcfg.group_id,
            kcfg.instance_id,
            kcfg.client,
            kcfg.consumer,
            kcfg.producer,
            config.checkpoint.transaction_timeout_ms,
        )
        self.client: kc.KafkaClient = kc.open_client(kcfg.client_library, settings)
        self.counters = ServiceCounters()
        self._stop = threading.Event()
        self._tasks: dict[int, set[str]] = {}  # partition → streams held
        self._dirty: dict[int, set[str]] = {}  # partition → streams changed since the last checkpoint
        self._ended: dict[int, set[str]] = {}  # partition → streams ended since the last checkpoint
        self._next_offsets: dict[tuple[str, int], int] = {}  # (topic, partition) → next offset to read
        self._last_checkpoint = time.monotonic()
        self._max_bytes = kcfg.max_message_bytes
        self._to_restore: set[int] = set()  # partitions assigned but not restored yet
        if ft is not None:
            self.engine.start_finetuning(ft)
        self._labels_wanted = ft is not None and ft.target == "feedback"
        # stream → recent (input offset, first step, timesteps), to address feedback by input offsets
        self._steps_at: dict[str, deque[tuple[int, int, int]]] = {}
        self.admin: AdminServer | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        kcfg = self.config.kafka
        inputs = kcfg.input_topics + ([kcfg.feedback_topic] if kcfg.feedback_topic else [])
        self.client.ensure_topics(
            inputs, [kcfg.output_topic, kcfg.dead_letter_topic], self.config.changelog_topic
        )
        self._install_signal_handlers()
        if self.config.metrics_port is not None:
            self.admin = AdminServer(self.engine, self.config.metrics_port, extra=self._service_counters)
            log.info("admin endpoint on http://%s (/metrics, /stats, /finetune/*)", self.admin.address)
        self.client.start(inputs, self._on_assigned, self._on_revoked)
        freeze_startup_objects()  # the clients too (see engine.runtime)
        log.info("instance %s consuming %s with %s", self.instance_id, kcfg.input_topics, kcfg.client_library)
        interval_s = self.config.checkpoint.interval_ms / 1e3
        try:
            while not self._stop.is_set():
                records = self.client.poll(0.005, kcfg.max_poll_records)
                if self._to_restore:  # before any record of a newly assigned partition is processed
                    self._restore_tasks(sorted(self._to_restore))
                    self._to_restore.clear()
                if records:
                    self._restore_unowned(records)
                    self._process(records)
                if time.monotonic() - self._last_checkpoint >= interval_s:
                    self._checkpoint()
            self._checkpoint()
        finally:
            self.client.close()
            self.engine.close()
            if self.admin is not None:
                self.admin.close()

    def _service_counters(self) -> dict[str, float]:
        counts = asdict(self.counters)
        counts.pop("started")
        return {k: float(v) for k, v in counts.items()}

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())

    # ---- processing ----------------------------------------------------------------------------------
    def _process(self, records: list[kc.Record]) -> None:
        """Decode, step and answer ``records`` (each stream's records are in offset order)."""
        batch = _Batch()
        next_offsets = self._next_offsets
        feedback_topic = self.config.kafka.feedback_topic
        feedback: list[kc.Record] = []
        for rec in records:
            next_offsets[(rec.topic, rec.partition)] = rec.offset + 1
            if rec.topic == feedback_topic:
                feedback.append(rec)  # applied after this poll's events
                continue
            sid, decoded = self._decode(rec)
            if decoded is None:
                continue
            if decoded.label is not None and self._labels_wanted:  # labels this message's timesteps
                try:
                    check_label(decoded.label)
                except DecodeError as exc:
                    self._dead_letter(rec, f"label: {exc}")
                    continue
                batch.add(rec, sid, decoded.xs)
                self._flush(batch)
                batch = _Batch()
                self._apply_label(rec, sid, decoded.label, start=-len(decoded.xs), end=None)
                continue
            if decoded.control in ("start", "reset"):
                self._flush(batch)
                batch = _Batch()
                self.engine.start(sid)
                self._dirty.setdefault(rec.partition, set()).add(sid)
            if len(decoded.xs):
                batch.add(rec, sid, decoded.xs)
            if decoded.control == "end":
                self._flush(batch)
                batch = _Batch()
                self._end(rec, sid)
        self._flush(batch)
        for rec in feedback:
            self._feedback(rec)
        self.counters.messages += len(records)

    def _feedback(self, rec: kc.Record) -> None:
        """A feedback-topic record: a label for a span of one stream's steps (bad ones: dead letter)."""
        try:
            if rec.key is None:
                raise DecodeError("missing key: the record key is the stream id")
            sid = rec.key.decode(errors="strict")
            fb = decode_feedback(rec.value)
        except (DecodeError, UnicodeDecodeError) as exc:
            self._dead_letter(rec, f"feedback: {exc}")
            return
        if not self._labels_wanted:
            self._dead_letter(rec, "feedback: this service does not fine-tune on labels (finetune.target)")
            return
        start, end = fb.start, fb.end
        if fb.last is not None:
            start, end = -fb.last, None
        elif fb.offsets is not None:
            span = self._steps_of_offsets(sid, *fb.offsets)
            if span is None:
                self._dead_letter(
                    rec, f"feedback: offsets {list(fb.offsets)} of {sid!r} are not in recent history"
                )
                return
            start, end = span
        self._apply_label(rec, sid, fb.label, start, end)

    def _apply_label(
        self, rec: kc.Record, sid: str, label: object, start: int | None, end: int | None
    ) -> None:
        try:
            labelled = self.engine.feedback(sid, check_label(label), start, end)
        except (DecodeError, ValueError) as exc:  # InvalidInputError is a ValueError
            self._dead_letter(rec, f"label: {exc}")
            return
        self.counters.labels += labelled

    def _steps_of_offsets(self, sid: str, first: int, last: int) -> tuple[int, int] | None:
        """The stream-local step span of the input messages at offsets ``first..last`` (inclusive)."""
        steps = [(s, s + n) for off, s, n in self._steps_at.get(sid, ()) if first <= off <= last]
        if not steps:
            return None
        return min(s for s, _ in steps), max(e for _, e in steps)

    def _note_steps(self, batch: _Batch) -> None:
        """Remember which stream-local steps each message of ``batch`` is about to take (feedback mode)."""
        tuner = self.engine.finetuner
        assert tuner is not None
        next_step: dict[str, int] = {}
        for rec, sid, n in batch.records:
            step = next_step.get(sid)
            if step is None:
                step = tuner.buffer.steps_of(sid)
            ring = self._steps_at.get(sid)
            if ring is None:
                ring = self._steps_at[sid] = deque(maxlen=256)
            ring.append((rec.offset, step, n))
            next_step[sid] = step + n

    def _decode(self, rec: kc.Record) -> tuple[str, Decoded | None]:
        """The record's stream id and content, or ``("", None)`` after sending it to the dead-letter
        topic."""
        try:
            if rec.key is None:
                raise DecodeError("missing key: the record key is the stream id")
            try:
                sid = rec.key.decode()
            except UnicodeDecodeError as exc:
                raise DecodeError("key is not UTF-8") from exc
            if rec.value is not None and len(rec.value) > self._max_bytes:
                raise DecodeError(f"oversized: {len(rec.value)} bytes > max {self._max_bytes}")
            return sid, self.decoder.decode(rec.value)
        except DecodeError as exc:
            self._dead_letter(rec, str(exc))
            return "", None

    def _dead_letter(self, rec: kc.Record, reason: str) -> None:
        self.counters.dead_letters += 1
        headers = kc.dead_letter_headers(reason, rec.topic, rec.partition, rec.offset)
        self.client.send(self.config.kafka.dead_letter_topic, rec.key, rec.value, headers)

    def _flush(self, batch: _Batch) -> None:
        """Step the batch's events through the engine and produce one output per message."""
        if not batch:
            return
        xs = batch.inputs(np.int64 if self.engine.model.categorical else np.float32)
        if self._labels_wanted:
            self._note_steps(batch)
        outputs = self.engine.step_many(batch.ids, xs)
        self.counters.events += len(xs)
        version = self.engine.model.info.version
        encoding = self.config.kafka.output_encoding
        dirty = self._dirty
        answers = []
        row = 0
        for rec, sid, n in batch.records:
            changed = dirty.get(rec.partition)
            if changed is None:
                changed = dirty[rec.partition] = set()
            changed.add(sid)
            source = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
            answers.append((rec.key, encode_output(outputs[row : row + n], source, version, encoding)))
            row += n
        self.client.send_many(self.config.kafka.output_topic, answers)
        self.counters.outputs += len(answers)

    def _end(self, rec: kc.Record, sid: str) -> None:
        try:
            final = self.engine.end(sid)
        except UnknownStreamError as exc:
            self._dead_letter(rec, f"control 'end': {exc}")
            return
        self._tasks.get(rec.partition, set()).discard(sid)
        self._dirty.get(rec.partition, set()).discard(sid)
        self._ended.setdefault(rec.partition, set()).add(sid)
        source = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset, "control": "end"}
        value = encode_output(
            final[None, :], source, self.engine.model.info.version, self.config.kafka.output_encoding
        )
        self.client.send(self.config.kafka.output_topic, rec.key, value)
        self.counters.outputs += 1

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        """Changed states + consumed offsets + everything produced since the last one: one transaction."""
        self._last_checkpoint = time.monotonic()
        if not self._next_offsets and not self._dirty and not self._ended:
            return
        changelog = self.config.changelog_topic
        for partition, sids in self._dirty.items():
            self._tasks.setdefault(partition, set()).update(sids)
            self._ended.get(partition, set()).difference_update(sids)  # ended, then started again
            snap = self.engine.snapshot(stream_ids=list(sids))
            if not len(snap):
                continue
            rows = torch.cat(snap.states, dim=1).numpy()
            for sid, row in zip(snap.stream_ids, rows, strict=True):
                self.client.send(changelog, str(sid).encode(), kc.encode_state_row(row), partition=partition)
        for partition, sids in self._ended.items():
            for sid in sids:
                self.client.send(changelog, sid.encode(), None, partition=partition)
        offsets = self._next_offsets
        self._dirty, self._ended, self._next_offsets = {}, {}, {}
        try:
            self.client.commit(offsets)
        except kc.TransactionFailed as exc:
            log.warning("checkpoint transaction failed (%s): aborting and reloading state", exc)
            self._abort_and_reload()
            return
        self.counters.checkpoints += 1

    def _abort_and_reload(self) -> None:
        """After a failed commit: drop every stream, restore the committed state, rewind the consumer to
        the committed offsets."""
        self.counters.aborts += 1
        self.client.abort()
        self._drop_tasks(set(self._tasks))
        self._restore_tasks(self.client.assigned_partitions())
        self.client.rewind_to_committed()

    # ---- rebalancing ---------------------------------------------------------------------------------
    def _on_revoked(self, partitions: list[int]) -> None:
        """Commit everything so far while we still own the partitions (called inside ``poll``)."""
        self.counters.rebalances += 1
        self._to_restore.difference_update(partitions)
        try:
            self._checkpoint()
            self._drop_tasks(set(partitions))
        except Exception:
            log.exception("while partitions were revoked")
            raise

    def _on_assigned(self, partitions: list[int]) -> None:
        """Note the partitions; the loop restores their streams right after ``poll`` returns, before
        processing anything (kafka-python does not allow other clients' work inside its callbacks)."""
        self._to_restore.update(partitions)

    def _restore_unowned(self, records: list[kc.Record]) -> None:
        """Records of a partition whose streams are not loaded (revoked, or never announced as assigned)
        mean the client broke its contract; stepping them would start their streams from scratch. Load
        the committed state first: the consumer's position follows on from the last checkpoint."""
        unowned = {r.partition for r in records}.difference(self._tasks)
        if unowned:
            log.error("records of partitions %s arrived without an assignment: restoring first", unowned)
            self._restore_tasks(sorted(unowned))

    def _drop_tasks(self, partitions: set[int]) -> None:
        for p in partitions:
            sids = self._tasks.pop(p, set())
            self.engine.release(list(sids))
            for sid in sids:
                self._steps_at.pop(sid, None)

    def _restore_tasks(self, partitions: list[int]) -> None:
        """Load the committed states of ``partitions`` not held yet."""
        wanted = set(partitions) - set(self._tasks)
        tables = self.client.read_changelog(self.config.changelog_topic, wanted)
        widths = self.engine.model.state_widths()
        for p, table in tables.items():
            ids = list(table)
            rows = np.stack([table[s] for s in ids]) if ids else np.zeros((0, sum(widths)), np.float32)
            states = list(torch.split(torch.from_numpy(rows.copy()), widths, dim=1))
            self.engine.restore(EngineSnapshot(ids, states), replace=False)
            self._tasks[p] = set(ids)
            self.counters.restored_streams += len(ids)
        restored = sum(len(t) for t in tables.values())
        log.info("assigned partitions %s: restored %d streams", sorted(partitions), restored)
