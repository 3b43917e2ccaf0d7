"""The replay buffer: what the fine-tuning worker learns from.

The engine hands it every event it applies (``record``) together with the state the stream had just
before that event. Per stream it keeps the last ``history_steps`` inputs and, every ``k1`` steps, the
state at that step (detached, on the CPU). From those it cuts TBPTT chunks:

- a chunk starts at a step ``s`` that is a multiple of ``k1``, carries the stream's state before step
  ``s`` and the inputs of steps ``s .. s+k2-1``; its loss covers the outputs of its last ``k1`` steps
  (``s+k2-k1 .. s+k2-1``), so the chunks of one stream tile its timeline with stride ``k1``;
- targets are either the **next input** (self-supervised: the output of step ``t`` should predict
  ``x[t+1]``; a chunk is ready once ``x[s+k2]`` has arrived), or **labels** given later through
  ``feedback`` for a step span (the chunk's steps without a label are masked out of the loss);
- with ``sequence_labels`` (for CTC), a feedback label is an unaligned sequence of class ids for a span
  ``[start, end)``: its chunk runs from the newest kept state at or before ``start`` to ``end`` (variable
  length), and the loss covers the span's outputs.

One chunk in ``validation_every`` is held back for validation and never trained on. Memory is bounded:
at most ``max_streams`` streams are tracked (later ones are not), and chunks are kept oldest-first-out
under a per-stream cap and a global cap. A chunk with a non-finite or out-of-range value (beyond
``max_abs_value``) is quarantined: counted, never used.

Storage: preallocated arrays, no object per event or chunk. Each tracked stream has a row: a ring of its
last ``history`` inputs, its step count, and a ring of its states at multiples of ``k1``. Chunks are rows
of a ``ChunkStore`` (``engine.replay_store``): fixed-size arrays in a memory file that the fine-tuning
worker maps and samples from in its own process. ``record`` handles a wave of up to ``SMALL_WAVE`` events
event by event and a larger one with a fixed number of numpy operations; next-step chunks are cut in
batches (whenever 8 are complete, or before anything reads the buffer).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from engine.replay_store import ChunkStore, Part, StoreLayout
from engine.state import StreamId

TargetKind = Literal["next", "feedback"]
SMALL_WAVE = 32
"""Waves of at most this many events are recorded event by event (``ReplayBuffer._record_small``)."""
IGNORE_LABEL = -100  # class-label targets equal to this are masked out (torch's cross-entropy default)


@dataclass
class Chunk:
    """One TBPTT window of one stream.

    ``start_state``: the stream's flat state before ``start_step``, one ``(width,)`` array per state tensor;
    ``xs``: ``(k2, F)`` float32 inputs (or ``(k2,)`` int64 ids); ``targets``: ``(k1, F)`` float32 for
    next-step targets, ``(k1,)`` int64 class ids or ``(k1, out)`` float32 for labels; ``mask``: ``(k1,)``
    bool, which of the last ``k1`` outputs are in the loss.
    """

    stream_id: StreamId
    seq: int
    start_step: int
    start_state: list[np.ndarray]
    xs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    sequence: bool = False  # a span chunk for CTC: ``xs (T, F)``, ``mask (T,)``, ``targets (L,)`` class ids


@dataclass
class ChunkBatch:
    """``B`` chunks stacked time-major for ``TBPTT``: ``start_state`` ``[(B, width)]``, ``xs (k2, B, ...)``,
    ``targets (k1, B, ...)``, ``mask (k1, B)``; ``seqs``: the chunks' arrival numbers.

    Span chunks (CTC) are padded at the end: ``xs (T_max, B, ...)``, ``mask (T_max, B)`` (False on padding),
    ``targets (B, L_max)`` with ``target_lengths (B,)``.
    """

    start_state: list[np.ndarray]
    xs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    seqs: list[int]
    target_lengths: np.ndarray | None = None

    @classmethod
    def stack(cls, chunks: Sequence[Chunk]) -> ChunkBatch:
        widths = len(chunks[0].start_state)
        start_state = [np.stack([c.start_state[j] for c in chunks]) for j in range(widths)]
        seqs = [c.seq for c in chunks]
        if not chunks[0].sequence:
            xs = np.stack([c.xs for c in chunks], axis=1)
            targets = np.stack([c.targets for c in chunks], axis=1)
            return cls(start_state, xs, targets, np.stack([c.mask for c in chunks], axis=1), seqs)
        steps, length = max(len(c.xs) for c in chunks), max(len(c.targets) for c in chunks)
        xs = np.zeros((steps, len(chunks), *chunks[0].xs.shape[1:]), chunks[0].xs.dtype)
        mask = np.zeros((steps, len(chunks)), bool)
        targets = np.zeros((len(chunks), length), np.int64)
        for b, c in enumerate(chunks):
            xs[: len(c.xs), b], mask[: len(c.mask), b], targets[b, : len(c.targets)] = c.xs, c.mask, c.targets
        lengths = np.array([len(c.targets) for c in chunks], np.int64)
        return cls(start_state, xs, targets, mask, seqs, lengths)

    def __len__(self) -> int:
        return self.xs.shape[1]


# ---- batches straight from a chunk store (the worker process, or the buffer's own thread) ---------------
def _rng(rng: random.Random | np.random.Generator) -> np.random.Generator:
    """A numpy generator: ``rng`` itself, or one seeded from a ``random.Random`` (reproducible)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng.getrandbits(64))


def gather_batch(part: Part, slots: np.ndarray, sequence: bool) -> ChunkBatch | None:
    """The chunks at ``slots`` of a store part as a time-major ``ChunkBatch`` (copies). Rows that were
    freed or rewritten while they were copied are left out (``None`` if none is left)."""
    before = part.seq[slots].copy()
    keep = before >= 0
    slots, before = slots[keep], before[keep]
    if not len(slots):
        return None
    states = [part[name][slots] for name in part.arrays if name.startswith("state_")]
    if not sequence:
        xs, targets, mask = part["xs"][slots], part["targets"][slots], part["mask"][slots]
        lengths = None
    else:
        xs_len, target_len = part["xs_len"][slots], part["target_len"][slots]
        steps, labels = int(xs_len.max()), int(target_len.max())
        xs, mask = part["xs"][slots, :steps], part["mask"][slots, :steps]
        targets = part["targets"][slots, :labels]
        pad = np.arange(steps)[None, :] >= xs_len[:, None]
        xs[pad] = 0
        mask[pad] = False
        targets[np.arange(labels)[None, :] >= target_len[:, None]] = 0
        lengths = target_len.astype(np.int64)
    same = part.seq[slots] == before  # rewritten meanwhile: drop (its copy may be torn)
    if not same.all():
        if not same.any():
            return None
        states = [s[same] for s in states]
        xs, targets, mask, before = xs[same], targets[same], mask[same], before[same]
        lengths = lengths[same] if lengths is not None else None
    if sequence:
        return ChunkBatch(
            states, np.ascontiguousarray(xs.swapaxes(0, 1)), targets, mask.T.copy(), before.tolist(), lengths
        )
    return ChunkBatch(
        states,
        np.ascontiguousarray(xs.swapaxes(0, 1)),
        np.ascontiguousarray(targets.swapaxes(0, 1)),
        mask.T.copy(),
        before.tolist(),
    )


def sample_store(store: ChunkStore, batch_size: int, rng: np.random.Generator) -> ChunkBatch | None:
    """Up to ``batch_size`` random training chunks of ``store`` (``None`` when there are none)."""
    high = store.counter("train_high")
    valid = np.flatnonzero(store.train.seq[:high] >= 0)
    if not len(valid):
        return None
    slots = rng.choice(valid, min(batch_size, len(valid)), replace=False)
    return gather_batch(store.train, slots, store.layout.sequence)


def validation_from_store(store: ChunkStore, max_size: int, since_seq: int = -1) -> ChunkBatch | None:
    """The newest held-back chunks of ``store`` (at most ``max_size``) that arrived after ``since_seq``."""
    written, rows = store.counter("validation_count"), store.layout.validation
    n = min(written, rows, max_size)
    slots = (written - n + np.arange(n)) % rows
    slots = slots[store.validation.seq[slots] > since_seq]
    return gather_batch(store.validation, slots, store.layout.sequence) if len(slots) else None


class ReplayBuffer:
    """Recent chunks of many streams for ``TBPTT(k1, k2)``; thread-safe.

    - ``feature_shape``: one event's input, ``(F,)`` floats or ``()`` for categorical ids;
    - ``target``: ``"next"`` or ``"feedback"``;
    - ``history_steps``: inputs kept per stream (how late feedback may arrive), at least ``k2 + 1``;
    - ``max_streams``, ``max_chunks``, ``max_chunks_per_stream``: the memory caps;
    - ``validation_every``: one chunk in this many is held back for validation;
    - ``max_abs_value``: inputs/targets beyond this magnitude quarantine their chunk;
    - ``sequence_labels``: feedback labels are unaligned class-id sequences for a span (CTC);
    - ``state_widths``, ``state_dtype``: the flat state (default: from the first ``record``);
    - ``target_shape``, ``target_dtype``: one step's feedback label (default: from the first label).

    Everything lives in preallocated arrays: per tracked stream (a row) a ring of its last
    ``history_steps`` inputs, its step count and a ring of its states at multiples of ``k1``; chunks are
    rows of a ``ChunkStore`` (``engine.replay_store``) that the worker process maps and samples itself.
    ``record`` does a fixed number of numpy operations per wave, whatever its size.
    """

    def __init__(
        self,
        k1: int,
        k2: int,
        feature_shape: tuple[int, ...],
        target: TargetKind = "next",
        history_steps: int = 256,
        max_streams: int = 10_000,
        max_chunks: int = 50_000,
        max_chunks_per_stream: int = 64,
        validation_every: int = 5,
        max_abs_value: float = 1e6,
        input_dtype: type = np.float32,
        sequence_labels: bool = False,
        state_widths: Sequence[int] | None = None,
        state_dtype: type = np.float32,
        target_shape: tuple[int, ...] | None = None,
        target_dtype: type | None = None,
    ) -> None:
        if not 1 <= k1 <= k2:
            raise ValueError(f"need 1 <= k1 <= k2, got k1={k1}, k2={k2}")
        if target not in ("next", "feedback"):
            raise ValueError(f"target must be 'next' or 'feedback', got {target!r}")
        self.k1, self.k2 = k1, k2
        self.target = target
        self.feature_shape = tuple(feature_shape)
        self.input_dtype = np.dtype(input_dtype)
        # Next-step chunks are cut in batches of up to ``_cut_batch`` (a vectorised cut costs about as
        # much for one chunk as for several): history and the state ring keep room for the wait.
        self._cut_batch = 8 if target == "next" else 1
        self.history = max(history_steps, k2 + 1 + self._cut_batch * k1)
        self.max_streams = max_streams
        self.max_chunks = max_chunks
        self.max_chunks_per_stream = max_chunks_per_stream
        self.validation_every = max(validation_every, 2)
        self.max_abs_value = max_abs_value
        self.sequence_labels = sequence_labels
        # States kept per stream: the chunks not cut yet (next-step targets), or all of history (labels).
        history_states = self.history // k1 + 2
        self._state_slots = k2 // k1 + 2 + self._cut_batch if target == "next" else history_states
        self._state_widths = None if state_widths is None else tuple(int(w) for w in state_widths)
        self._state_dtype = np.dtype(state_dtype)
        if target == "next":
            target_shape, target_dtype = self.feature_shape, np.float32
        elif sequence_labels:
            target_shape, target_dtype = (), np.int64
        self._target_shape = None if target_shape is None else tuple(target_shape)
        self._target_dtype = None if target_dtype is None else np.dtype(target_dtype)
        self.store: ChunkStore | None = None
        self._rows: dict[StreamId, int] = {}
        self._free_rows: list[int] = []
        self._used_rows = 0
        self._capacity = 0
        self._labels: dict[int, dict[int, np.ndarray | int]] = {}
        self._due_rows: list[int] = []  # next-step chunks complete and not cut yet: rows, start steps
        self._due_starts: list[int] = []
        self._seq = 0
        self._lock = threading.Lock()
        self.counts = {"events": 0, "chunks": 0, "validation_chunks": 0, "quarantined": 0, "labels": 0}
        self.record_s = 0.0
        self._grow(min(max_streams, 256))

    # ---- preallocated arrays ---------------------------------------------------------------------------
    def _grow(self, rows: int) -> None:
        """Room for ``rows`` streams (the arrays keep their contents)."""
        old, self._capacity = self._capacity, rows
        s, m = self._state_slots, self.max_chunks_per_stream

        def grown(name: str, shape: tuple[int, ...], dtype: np.dtype | type, fill: int | None = None):
            new = np.zeros((rows, *shape), dtype) if fill is None else np.full((rows, *shape), fill, dtype)
            if old:
                new[:old] = getattr(self, name)
            setattr(self, name, new)

        grown("_inputs", (self.history, *self.feature_shape), self.input_dtype)
        grown("_steps", (), np.int64)
        grown("_last_bad", (), np.int64, -(10**18))  # the latest step with a non-finite/huge state
        grown("_state_step", (s,), np.int64, -1)  # which step each state slot holds (-1: none)
        grown("_row_chunks", (m,), np.int64)  # the stream's train chunks (store rows), oldest first
        grown("_row_chunk_seq", (m,), np.int64)
        grown("_row_head", (), np.int64)
        grown("_row_count", (), np.int64)
        grown("_row_sid", (), object)
        if self._state_widths is not None:
            states = getattr(self, "_states", None)
            self._states = [np.zeros((rows, s, w), self._state_dtype) for w in self._state_widths]
            if states:
                for new, prev in zip(self._states, states, strict=True):
                    new[:old] = prev
        else:
            self._states = []

    def _open(self) -> ChunkStore:
        """The chunk store (created on first use, once the state and target layouts are known)."""
        if self.store is None:
            if self._state_widths is None or self._target_shape is None or self._target_dtype is None:
                raise RuntimeError("the chunk store needs the state widths and the target layout")
            sequence = self.sequence_labels
            layout = StoreLayout(
                feature_shape=self.feature_shape,
                input_dtype=self.input_dtype.str,
                target_shape=self._target_shape,
                target_dtype=self._target_dtype.str,
                steps=self.history if sequence else self.k2,
                target_steps=self.history if sequence else self.k1,
                mask_steps=self.history if sequence else self.k1,
                state_widths=self._state_widths,
                state_dtype=self._state_dtype.str,
                train=self.max_chunks,
                validation=max(64, self.max_chunks // self.validation_every),
                sequence=sequence,
            )
            self.store = ChunkStore.create(layout)
            self._free = np.arange(self.max_chunks, dtype=np.int64)[::-1].copy()  # lowest rows first
            self._nfree = self.max_chunks
            self._order_slot = np.zeros(2 * self.max_chunks + 64, np.int64)  # train chunks, arrival order
            self._order_seq = np.zeros(2 * self.max_chunks + 64, np.int64)
            self._order_head = self._order_tail = 0
            self._validation_sid = np.empty(layout.validation, object)
            self._train_sid = np.empty(self.max_chunks, object)
        return self.store

    def open_store(self) -> StoreLayout | None:
        """Create the chunk store now if its layout is known (for a worker to map before any chunk);
        returns its layout, or ``None`` when it must wait for the first event or label."""
        with self._lock:
            try:
                return self._open().layout
            except RuntimeError:
                return None

    def close(self) -> None:
        """Release the chunk store's memory (the buffer is unusable afterwards)."""
        with self._lock:
            if self.store is not None:
                self.store.close()
                self.store = None

    # ---- intake (the engine's step loop) -------------------------------------------------------------
    def _rows_for(self, stream_ids: Sequence[StreamId]) -> list[int]:
        """The streams' rows; new streams get one while there is room, the others ``-1``."""
        get = self._rows.get
        rows = [get(sid, -1) for sid in stream_ids]
        if -1 in rows:
            for i, sid in enumerate(stream_ids):
                if rows[i] < 0 and len(self._rows) < self.max_streams:
                    rows[i] = self._new_row(sid)
        return rows

    def _new_row(self, sid: StreamId) -> int:
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            if self._used_rows == self._capacity:
                self._grow(min(self.max_streams, 2 * self._capacity))
            row, self._used_rows = self._used_rows, self._used_rows + 1
        self._rows[sid] = row
        self._row_sid[row] = sid
        return row

    def _clear_rows(self, rows: np.ndarray | slice) -> None:
        self._steps[rows] = 0
        self._last_bad[rows] = -(10**18)
        self._state_step[rows] = -1
        self._row_head[rows] = 0
        self._row_count[rows] = 0
        self._row_sid[rows] = None

    def record(self, stream_ids: Sequence[StreamId], xs: np.ndarray, state_before: list[Tensor]) -> None:
        """Events just applied: ``xs (N, ...)`` of ``stream_ids`` (each at most once), and the streams'
        state before them, ``[(N, width)]`` (rows are read only at chunk starts). Its time, which the step
        loop spends, adds up in ``record_s`` (seconds)."""
        started = time.perf_counter()
        try:
            self._record(stream_ids, xs, state_before)
        finally:
            self.record_s += time.perf_counter() - started

    def _record(self, stream_ids: Sequence[StreamId], xs: np.ndarray, state_before: list[Tensor]) -> None:
        with self._lock:
            if not self._states:
                self._state_widths = tuple(int(s.shape[1]) for s in state_before)
                self._state_dtype = np.dtype(str(state_before[0].dtype).removeprefix("torch."))
                self._grow(self._capacity)
            listed = self._rows_for(stream_ids)
            where = None
            if -1 in listed:  # beyond max_streams: not tracked
                where = np.flatnonzero(np.array(listed) >= 0)
                if not len(where):
                    return
                listed, xs = [listed[i] for i in where.tolist()], xs[where]
            # Inputs are checked for non-finite or huge values when a chunk is cut (once per k1 steps).
            if len(listed) <= SMALL_WAVE and self.target == "next":
                self._record_small(listed, xs, where, state_before)
                return
            # A fixed number of numpy operations per wave, whatever its size.
            rows = np.array(listed, np.int64)
            steps = self._steps[rows]
            self._inputs[rows, steps % self.history] = xs
            self._steps[rows] = steps + 1
            phase = steps % self.k1
            at = np.flatnonzero(phase == 0)
            if len(at):
                self._keep_states(rows[at], steps[at], at if where is None else where[at], state_before)
            self.counts["events"] += len(rows)
            if self.target == "next":
                # The chunk starting at steps - k2 is complete: its last next-step target x[s+k2] just came.
                due = np.flatnonzero((phase == self.k2 % self.k1) & (steps >= self.k2))
                if len(due):
                    self._due_rows += rows[due].tolist()
                    self._due_starts += (steps[due] - self.k2).tolist()
                    if len(self._due_rows) >= self._cut_batch:
                        self._cut_due()
            elif self._labels:
                self._on_labelled_steps(rows, steps + 1)

    def _record_small(
        self, rows: list[int], xs: np.ndarray, where: np.ndarray | None, state_before: list[Tensor]
    ) -> None:
        """``record`` for a few events (next-step targets): plain Python per event beats a dozen numpy
        calls per wave here."""
        k1, k2 = self.k1, self.k2
        due_phase = k2 % k1
        at: list[int] = []
        if len(rows) <= 2:
            steps_of, inputs, history = self._steps, self._inputs, self.history
            steps = []
            for i, row in enumerate(rows):
                step = int(steps_of[row])
                steps_of[row] = step + 1
                inputs[row, step % history] = xs[i]
                steps.append(step)
        else:
            picked_rows = np.array(rows)
            stepped = self._steps[picked_rows]
            self._steps[picked_rows] = stepped + 1
            self._inputs[picked_rows, stepped % self.history] = xs
            steps = stepped.tolist()
        for i, step in enumerate(steps):
            phase = step % k1
            if phase == 0:
                at.append(i)
            if phase == due_phase and step >= k2:
                self._due_rows.append(rows[i])
                self._due_starts.append(step - k2)
        self.counts["events"] += len(rows)
        if at:
            picked = np.array(at)
            rows_at = np.array(rows)[picked]
            self._keep_states(
                rows_at, self._steps[rows_at] - 1, picked if where is None else where[picked], state_before
            )
        if len(self._due_rows) >= self._cut_batch:
            self._cut_due()

    def _keep_states(
        self, rows: np.ndarray, steps: np.ndarray, positions: np.ndarray, state_before: list[Tensor]
    ) -> None:
        """Keep the states before ``steps`` (multiples of k1) of ``rows``: ``state_before[positions]``."""
        if len(positions) == len(state_before[0]):
            values = [s.detach().cpu().numpy() for s in state_before]
        else:
            idx = torch.from_numpy(positions).to(state_before[0].device)
            values = [s.index_select(0, idx).cpu().numpy() for s in state_before]
        slot = (steps // self.k1) % self._state_slots
        for kept, value in zip(self._states, values, strict=True):
            kept[rows, slot] = value
        self._state_step[rows, slot] = steps
        bad = self._bad_rows(np.concatenate(values, axis=1) if len(values) > 1 else values[0])
        if bad is not None:
            self._last_bad[rows[bad]] = steps[bad]  # no chunk may start from (or span) this state

    def _on_labelled_steps(self, rows: np.ndarray, n: np.ndarray) -> None:
        """Feedback targets: cut the chunks that the new steps complete, for streams with labels; forget
        labels that fell out of history."""
        for row, steps in zip(rows.tolist(), n.tolist(), strict=True):
            labels = self._labels.get(row)
            if not labels:
                continue
            start = steps - self.k2
            if start >= 0 and start % self.k1 == 0 and not self.sequence_labels:
                self._cut_labelled(row, start, None)
            if steps % self.k1 == 0:
                for step in [t for t in labels if t < steps - self.history]:
                    del labels[step]

    def _cut_due(self) -> None:
        """Cut the next-step chunks that are complete (under the lock)."""
        if self._due_rows:
            rows, starts = np.array(self._due_rows, np.int64), np.array(self._due_starts, np.int64)
            self._due_rows, self._due_starts = [], []
            self._cut_next(rows, starts)

    def _cut_next(self, rows: np.ndarray, starts: np.ndarray) -> None:
        """Next-step chunks starting at ``starts`` of ``rows`` (whose targets have all arrived)."""
        slot = (starts // self.k1) % self._state_slots
        ok = self._state_step[rows, slot] == starts
        if not ok.all():
            rows, starts, slot = rows[ok], starts[ok], slot[ok]
            if not len(rows):
                return
        seqs = self._seq + np.arange(len(rows), dtype=np.int64)
        self._seq += len(rows)
        window = self._inputs[rows[:, None], (starts[:, None] + np.arange(self.k2 + 1)) % self.history]
        last_bad = self._last_bad[rows]
        quarantined = (starts <= last_bad) & (last_bad < starts + self.k2 + 1)
        bad_input = self._bad_rows(window)
        if bad_input is not None:
            quarantined |= bad_input
        if quarantined.any():
            self.counts["quarantined"] += int(quarantined.sum())
            keep = ~quarantined
            rows, starts, slot, seqs, window = rows[keep], starts[keep], slot[keep], seqs[keep], window[keep]
            if not len(rows):
                return
        self._file(
            rows,
            seqs,
            starts,
            window[:, : self.k2],
            window[:, self.k2 - self.k1 + 1 :],
            True,
            [s[rows, slot] for s in self._states],
        )

    def _cut_labelled(self, row: int, start: int, only_steps: set[int] | None) -> None:
        """The feedback chunk of ``row`` starting at ``start``, if it has a label in its loss window."""
        slot = (start // self.k1) % self._state_slots
        if self._state_step[row, slot] != start or start < self._steps[row] - self.history:
            return  # out of history
        last = start + self.k2
        window = self._window(row, start, last)
        if start <= self._last_bad[row] < last or self._bad_rows(window[None]) is not None:
            self._seq += 1
            self.counts["quarantined"] += 1
            return
        labels = self._labels.get(row, {})
        loss_steps = range(start + self.k2 - self.k1, start + self.k2)
        labelled = [t in labels and (only_steps is None or t in only_steps) for t in loss_steps]
        if not any(labelled):
            return
        targets, mask = self._label_targets(labels, loss_steps, labelled)
        seq = self._seq
        self._seq += 1
        self._file(
            np.array([row]),
            np.array([seq]),
            np.array([start]),
            window[None],
            targets[None],
            mask[None],
            [s[row, slot][None] for s in self._states],
        )

    def _cut_span(self, row: int, start: int, end: int, labels: np.ndarray) -> bool:
        """A CTC chunk from the newest kept state at or before ``start`` to ``end``; loss on the span."""
        steps = int(self._steps[row])
        kept = self._state_step[row]
        kept = kept[(kept >= 0) & (kept >= steps - self.history) & (kept <= start)]
        if not len(kept) or end > steps:
            return False
        first = int(kept.max())
        window = self._window(row, first, end)
        if first <= self._last_bad[row] < end or self._bad_rows(window[None]) is not None:
            self.counts["quarantined"] += 1
            return False
        slot = (first // self.k1) % self._state_slots
        seq = self._seq
        self._seq += 1
        self._file(
            np.array([row]),
            np.array([seq]),
            np.array([first]),
            window[None],
            labels.astype(np.int64)[None],
            (np.arange(first, end) >= start)[None],
            [s[row, slot][None] for s in self._states],
        )
        return True

    def _label_targets(
        self, labels: dict[int, np.ndarray | int], loss_steps: range, labelled: list[bool]
    ) -> tuple[np.ndarray, np.ndarray]:
        example = next(labels[t] for t, ok in zip(loss_steps, labelled, strict=True) if ok)
        if self._target_shape is None:  # the first label fixes the layout
            self._target_shape = tuple(np.shape(example))
            self._target_dtype = np.dtype(np.int64 if np.ndim(example) == 0 else np.float32)
        if np.ndim(example) == 0:  # class ids
            targets = np.full(self.k1, IGNORE_LABEL, dtype=np.int64)
        else:
            targets = np.zeros((self.k1, *np.shape(example)), dtype=np.float32)
        for j, (t, ok) in enumerate(zip(loss_steps, labelled, strict=True)):
            if ok:
                targets[j] = labels[t]
        return targets, np.array(labelled, dtype=bool)

    def _window(self, row: int, first: int, end: int) -> np.ndarray:
        """A copy of the inputs of steps ``[first, end)`` of ``row`` from its ring."""
        return self._inputs[row, np.arange(first, end) % self.history]

    def _bad_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """Which rows hold a non-finite or out-of-range value (``None`` for integer ids)."""
        if rows.dtype.kind != "f":
            return None
        flat = np.abs(rows.reshape(len(rows), -1))
        if flat.max(initial=0.0) <= self.max_abs_value:  # the common case, one reduction (NaN fails it)
            return None
        return ~(flat <= self.max_abs_value).all(axis=1)

    # ---- the chunk store ------------------------------------------------------------------------------
    def _file(
        self,
        rows: np.ndarray,
        seqs: np.ndarray,
        starts: np.ndarray,
        xs: np.ndarray,
        targets: np.ndarray,
        mask: np.ndarray | bool,
        states: list[np.ndarray],
    ) -> None:
        """File new (sane) chunks, one per row (each row at most once): every ``validation_every``-th
        arrival number is held back for validation, the others are kept for training."""
        store = self._open()
        held = seqs % self.validation_every == self.validation_every - 1
        parts = [(held, True), (~held, False)] if held.any() else [(None, False)]
        for pick, validation in parts:
            if pick is None:
                args = (rows, seqs, starts, xs, targets, mask, states)
            else:
                if not pick.any():
                    continue
                m = mask if isinstance(mask, bool) else mask[pick]
                args = (
                    rows[pick],
                    seqs[pick],
                    starts[pick],
                    xs[pick],
                    targets[pick],
                    m,
                    [s[pick] for s in states],
                )
            if validation:
                slots = self._validation_slots(store, len(args[1]))
                self._write(store.validation, slots, *args[1:])
                self._validation_sid[slots] = self._row_sid[args[0]]
                self.counts["validation_chunks"] += len(slots)
            else:
                self._add_train(store, *args)

    def _write(
        self,
        part: Part,
        slots: np.ndarray,
        seqs: np.ndarray,
        starts: np.ndarray,
        xs: np.ndarray,
        targets: np.ndarray,
        mask: np.ndarray | bool,
        states: list[np.ndarray],
    ) -> None:
        """Fill store rows ``slots``; the arrival numbers go in last (what a reader checks)."""
        part.seq[slots] = -1
        part["start"][slots] = starts
        if self.sequence_labels:  # one span chunk: variable lengths
            (slot,) = slots
            steps, labels = xs.shape[1], targets.shape[1]
            if labels > part["targets"].shape[1]:
                raise ValueError(f"a transcript of {labels} labels is longer than history ({self.history})")
            part["xs"][slot, :steps] = xs[0]
            part["mask"][slot] = False
            part["mask"][slot, :steps] = mask[0]  # type: ignore[index]
            part["targets"][slot, :labels] = targets[0]
            part["xs_len"][slot], part["target_len"][slot] = steps, labels
        else:
            part["xs"][slots] = xs
            part["targets"][slots] = targets
            part["mask"][slots] = mask
        for j, state in enumerate(states):
            part[f"state_{j}"][slots] = state
        part.seq[slots] = seqs

    def _validation_slots(self, store: ChunkStore, n: int) -> np.ndarray:
        written = store.counter("validation_count")
        rows = store.layout.validation
        slots = (written + np.arange(n)) % rows
        store.set_counter("validation_count", written + n)  # readers skip rows whose seq is -1 meanwhile
        return slots

    def _add_train(
        self,
        store: ChunkStore,
        rows: np.ndarray,
        seqs: np.ndarray,
        starts: np.ndarray,
        xs: np.ndarray,
        targets: np.ndarray,
        mask: np.ndarray | bool,
        states: list[np.ndarray],
    ) -> None:
        """Keep train chunks: evict each stream's oldest beyond ``max_chunks_per_stream`` and the oldest
        overall beyond ``max_chunks``, then write them into free rows."""
        per_stream = self.max_chunks_per_stream
        full = np.flatnonzero(self._row_count[rows] >= per_stream)
        if len(full):
            streams = rows[full]
            head = self._row_head[streams]
            slot, seq = self._row_chunks[streams, head], self._row_chunk_seq[streams, head]
            self._free_slots(store, slot[store.train.seq[slot] == seq])
            self._row_head[streams] = (head + 1) % per_stream
            self._row_count[streams] -= 1
        n = len(seqs)
        if self._nfree < n:
            self._evict_oldest(store, n - self._nfree)
        slots = self._free[self._nfree - n : self._nfree][::-1].copy()
        self._nfree -= n
        self._write(store.train, slots, seqs, starts, xs, targets, mask, states)
        self._train_sid[slots] = self._row_sid[rows]
        pos = (self._row_head[rows] + self._row_count[rows]) % per_stream
        self._row_chunks[rows, pos] = slots
        self._row_chunk_seq[rows, pos] = seqs
        self._row_count[rows] += 1
        if self._order_tail - self._order_head + n > len(self._order_slot):
            self._compact_order(store)
        at = np.arange(self._order_tail, self._order_tail + n) % len(self._order_slot)
        self._order_slot[at], self._order_seq[at] = slots, seqs
        self._order_tail += n
        self.counts["chunks"] += n
        store.set_counter("train_count", store.counter("train_count") + n)
        store.set_counter("train_high", max(store.counter("train_high"), int(slots.max()) + 1))
        store.set_counter("next_seq", self._seq)

    def _free_slots(self, store: ChunkStore, slots: np.ndarray) -> None:
        if not len(slots):
            return
        store.train.seq[slots] = -1
        self._train_sid[slots] = None
        self._free[self._nfree : self._nfree + len(slots)] = slots
        self._nfree += len(slots)
        store.set_counter("train_count", store.counter("train_count") - len(slots))

    def _evict_oldest(self, store: ChunkStore, k: int) -> None:
        """Free the ``k`` oldest train chunks (entries of chunks evicted per stream are skipped)."""
        size = len(self._order_slot)
        while k > 0 and self._order_tail > self._order_head:
            width = min(self._order_tail - self._order_head, max(2 * k, 64))
            at = np.arange(self._order_head, self._order_head + width) % size
            slot, seq = self._order_slot[at], self._order_seq[at]
            live = store.train.seq[slot] == seq
            count = np.cumsum(live)
            cut = int(np.searchsorted(count, k)) + 1 if count[-1] >= k else width
            victims = slot[:cut][live[:cut]]
            self._free_slots(store, victims)
            k -= len(victims)
            self._order_head += cut

    def _compact_order(self, store: ChunkStore) -> None:
        size = len(self._order_slot)
        at = np.arange(self._order_head, self._order_tail) % size
        slot, seq = self._order_slot[at], self._order_seq[at]
        live = store.train.seq[slot] == seq
        n = int(live.sum())
        self._order_slot[:n], self._order_seq[:n] = slot[live], seq[live]
        self._order_head, self._order_tail = 0, n

    # ---- labels ---------------------------------------------------------------------------------------
    def feedback(
        self,
        stream_id: StreamId,
        label: int | Sequence[float] | np.ndarray,
        start: int | None = None,
        end: int | None = None,
    ) -> int:
        """Label the stream's steps ``[start, end)`` (stream-local step numbers, counted from the first
        recorded event; negative ones count back from the next step, like Python slices: ``start=-3`` is
        the last 3 steps; default: the latest step). Returns how many steps were labelled (0 when the
        stream is not tracked or the span fell out of history)."""
        with self._lock:
            row = self._rows.get(stream_id)
            if row is None:
                return 0
            steps = int(self._steps[row])
            if start is not None and start < 0:
                start += steps
            if end is not None and end < 0:
                end += steps
            if self.sequence_labels:
                return self._sequence_feedback(row, label, start, end)
            end = steps if end is None else min(end, steps)
            start = end - 1 if start is None else start
            start = max(start, steps - self.history, 0)
            if end <= start:
                return 0
            value = np.asarray(label)
            stored: int | np.ndarray = int(value) if value.ndim == 0 else value.astype(np.float32)
            labels = self._labels.setdefault(row, {})
            for t in range(start, end):
                labels[t] = stored
            self.counts["labels"] += end - start
            # Windows already complete are cut now (for the new labels only); later ones when they complete.
            first = max(0, (start - (self.k2 - self.k1)) // self.k1 * self.k1)
            new_steps = set(range(start, end))
            for s in range(first, end, self.k1):
                if s + self.k2 <= steps:
                    self._cut_labelled(row, s, new_steps)
            return end - start

    def _sequence_feedback(self, row: int, label: object, start: int | None, end: int | None) -> int:
        labels = np.asarray(label)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0:
            raise ValueError("a CTC label is a non-empty sequence of class ids")
        if start is None:
            raise ValueError("a CTC label needs the span it transcribes: start (and end, default: now)")
        steps = int(self._steps[row])
        end = steps if end is None else end
        if not 0 <= start < end <= steps:
            raise ValueError(f"span [{start}, {end}) is not within the stream's {steps} steps")
        if not self._cut_span(row, start, end, labels):
            return 0  # fell out of history
        self.counts["labels"] += end - start
        return end - start

    def steps_of(self, stream_id: StreamId) -> int:
        """How many events of the stream were recorded (its next step's number); 0 if not tracked."""
        with self._lock:
            row = self._rows.get(stream_id)
            return int(self._steps[row]) if row is not None else 0

    # ---- lifecycle of streams --------------------------------------------------------------------------
    def forget(self, stream_ids: Sequence[StreamId] | None = None) -> None:
        """Drop the history of streams whose state was reset or replaced (all when ``None``): a chunk may
        not span a state discontinuity. Chunks already cut stay."""
        with self._lock:
            self._cut_due()  # complete chunks are cut before their history goes
            if stream_ids is None:
                self._rows.clear()
                self._labels.clear()
                self._clear_rows(slice(None))
                self._free_rows, self._used_rows = [], 0
                return
            for sid in stream_ids:
                row = self._rows.pop(sid, None)
                if row is not None:
                    self._clear_rows(np.array([row]))
                    self._labels.pop(row, None)
                    self._free_rows.append(row)

    # ---- sampling (the worker, when it runs in this process) ------------------------------------------
    def sample(self, batch_size: int, rng: random.Random | np.random.Generator) -> ChunkBatch | None:
        """Up to ``batch_size`` random training chunks, or ``None`` when there are none."""
        with self._lock:
            self._cut_due()
            if self.store is None:
                return None
            return sample_store(self.store, batch_size, _rng(rng))

    def validation_batch(self, max_size: int, since_seq: int = -1) -> ChunkBatch | None:
        """The newest held-back chunks (at most ``max_size``) that arrived after ``since_seq``."""
        with self._lock:
            self._cut_due()
            if self.store is None:
                return None
            return validation_from_store(self.store, max_size, since_seq)

    def _chunks(self, part: Part, sids: np.ndarray) -> list[Chunk]:
        slots = np.flatnonzero(part.seq >= 0)
        slots = slots[np.argsort(part.seq[slots], kind="stable")]
        out = []
        for slot in slots.tolist():
            n_x = int(part["xs_len"][slot]) if self.sequence_labels else None
            n_t = int(part["target_len"][slot]) if self.sequence_labels else None
            states = [part[name][slot].copy() for name in part.arrays if name.startswith("state_")]
            out.append(
                Chunk(
                    sids[slot],
                    int(part.seq[slot]),
                    int(part["start"][slot]),
                    states,
                    part["xs"][slot, :n_x].copy(),
                    part["targets"][slot, :n_t].copy(),
                    part["mask"][slot, :n_x].copy(),
                    sequence=self.sequence_labels,
                )
            )
        return out

    def train_chunks(self) -> list[Chunk]:
        """The training chunks held, oldest first, as objects (for inspection; slow)."""
        with self._lock:
            self._cut_due()
            return [] if self.store is None else self._chunks(self.store.train, self._train_sid)

    def validation_chunks(self) -> list[Chunk]:
        """The held-back chunks kept, oldest first, as objects (for inspection; slow)."""
        with self._lock:
            self._cut_due()
            return [] if self.store is None else self._chunks(self.store.validation, self._validation_sid)

    @property
    def next_seq(self) -> int:
        """The arrival number the next chunk will get (chunks complete and not cut yet count as cut)."""
        return self._seq + len(self._due_rows)

    def __len__(self) -> int:
        """Training chunks held (cutting those complete first)."""
        if self._due_rows:
            with self._lock:
                self._cut_due()
        return 0 if self.store is None else self.store.counter("train_count")

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._cut_due()
            store = self.store
            return {
                **self.counts,
                "tracked_streams": len(self._rows),
                "train_chunks_held": len(self),
                "validation_chunks_held": 0
                if store is None
                else min(store.counter("validation_count"), store.layout.validation),
            }
