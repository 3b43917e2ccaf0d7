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
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from engine.state import StreamId

TargetKind = Literal["next", "feedback"]
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


@dataclass
class _Track:
    """One stream's recent history: inputs by step (a ring of ``history`` rows), states at multiples of
    ``k1``, and labels waiting for their chunk."""

    inputs: np.ndarray
    steps: int = 0
    last_bad: int = -(10**18)  # the latest step whose input was non-finite or out of range
    states: dict[int, list[np.ndarray]] = field(default_factory=dict)
    labels: dict[int, np.ndarray | int] = field(default_factory=dict)
    chunk_seqs: deque[int] = field(default_factory=deque)


class ReplayBuffer:
    """Recent chunks of many streams for ``TBPTT(k1, k2)``; thread-safe.

    - ``feature_shape``: one event's input, ``(F,)`` floats or ``()`` for categorical ids;
    - ``target``: ``"next"`` or ``"feedback"``;
    - ``history_steps``: inputs kept per stream (how late feedback may arrive), at least ``k2 + 1``;
    - ``max_streams``, ``max_chunks``, ``max_chunks_per_stream``: the memory caps;
    - ``validation_every``: one chunk in this many is held back for validation;
    - ``max_abs_value``: inputs/targets beyond this magnitude quarantine their chunk;
    - ``sequence_labels``: feedback labels are unaligned class-id sequences for a span (CTC).
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
    ) -> None:
        if not 1 <= k1 <= k2:
            raise ValueError(f"need 1 <= k1 <= k2, got k1={k1}, k2={k2}")
        if target not in ("next", "feedback"):
            raise ValueError(f"target must be 'next' or 'feedback', got {target!r}")
        self.k1, self.k2 = k1, k2
        self.target = target
        self.feature_shape = feature_shape
        self.input_dtype = np.dtype(input_dtype)
        self.history = max(history_steps, k2 + 1)
        self.max_streams = max_streams
        self.max_chunks = max_chunks
        self.max_chunks_per_stream = max_chunks_per_stream
        self.validation_every = max(validation_every, 2)
        self.max_abs_value = max_abs_value
        self.sequence_labels = sequence_labels
        self._tracks: dict[StreamId, _Track] = {}
        self._train: OrderedDict[int, Chunk] = OrderedDict()
        self._validation: deque[Chunk] = deque(maxlen=max(64, max_chunks // self.validation_every))
        self._seq = 0
        self._lock = threading.Lock()
        self.counts = {"events": 0, "chunks": 0, "validation_chunks": 0, "quarantined": 0, "labels": 0}

    # ---- intake (the engine's step loop) -------------------------------------------------------------
    def record(self, stream_ids: Sequence[StreamId], xs: np.ndarray, state_before: list[Tensor]) -> None:
        """Events just applied: ``xs (N, ...)`` of ``stream_ids`` (each at most once), and the streams'
        state before them, ``[(N, width)]`` (rows are read only at chunk starts)."""
        bad = self._bad_rows(xs)
        with self._lock:
            tracked: list[tuple[StreamId, _Track]] = []
            boundary_rows: list[int] = []
            for i, sid in enumerate(stream_ids):
                track = self._tracks.get(sid)
                if track is None:
                    if len(self._tracks) >= self.max_streams:
                        continue
                    track = _Track(np.zeros((self.history, *self.feature_shape), self.input_dtype))
                    self._tracks[sid] = track
                if track.steps % self.k1 == 0:
                    boundary_rows.append(i)
                tracked.append((sid, track))
                track.inputs[track.steps % self.history] = xs[i]
                if bad is not None and bad[i]:
                    track.last_bad = track.steps
            if boundary_rows:
                idx = torch.tensor(boundary_rows, device=state_before[0].device)
                rows = [s.index_select(0, idx).cpu().numpy() for s in state_before]
                bad_state = self._bad_rows(np.concatenate(rows, axis=1))
                for j, i in enumerate(boundary_rows):
                    track = self._tracks[stream_ids[i]]
                    if bad_state is not None and bad_state[j]:
                        track.last_bad = track.steps  # no chunk may start from (or span) this state
                    track.states[track.steps] = [r[j].copy() for r in rows]
            self.counts["events"] += len(tracked)
            for sid, track in tracked:
                track.steps += 1
                self._on_step(sid, track)

    def _on_step(self, sid: StreamId, track: _Track) -> None:
        """Cut whatever chunk the stream's newest step completes; forget history that fell out."""
        n = track.steps
        if self.target == "next":
            start = n - self.k2 - 1  # the chunk whose next-step target x[s+k2] just arrived
            if start >= 0 and start % self.k1 == 0:
                self._cut(sid, track, start, None)
        else:
            start = n - self.k2
            if start >= 0 and start % self.k1 == 0 and track.labels:
                self._cut(sid, track, start, None)
        if n % self.k1:
            return
        # Forget what fell out of history since the previous boundary (states sit at multiples of k1).
        oldest = n - self.history
        track.states.pop((oldest - 1) // self.k1 * self.k1, None)
        if track.labels:
            for step in range(oldest - self.k1, oldest):
                track.labels.pop(step, None)

    def _cut(self, sid: StreamId, track: _Track, start: int, only_steps: set[int] | None) -> None:
        state = track.states.get(start)
        if state is None or start < track.steps - self.history:
            return  # out of history
        last = start + self.k2 + (self.target == "next")  # the next-step target of the last output
        if start <= track.last_bad < last:
            self._seq += 1
            self.counts["quarantined"] += 1
            return
        window = self._window(track, start, last)
        xs = window[: self.k2]
        loss_steps = range(start + self.k2 - self.k1, start + self.k2)
        if self.target == "next":
            targets = window[self.k2 - self.k1 + 1 :].astype(np.float32, copy=False)
            mask = np.ones(self.k1, dtype=bool)
        else:
            labelled = [t in track.labels and (only_steps is None or t in only_steps) for t in loss_steps]
            if not any(labelled):
                return
            targets, mask = self._label_targets(track, loss_steps, labelled)
        self._keep(track, Chunk(sid, self._seq, start, [s.copy() for s in state], xs, targets, mask))

    def _cut_span(self, sid: StreamId, track: _Track, start: int, end: int, labels: np.ndarray) -> bool:
        """A CTC chunk from the newest kept state at or before ``start`` to ``end``; loss on the span."""
        kept = [s for s in track.states if track.steps - self.history <= s <= start]
        if not kept or end > track.steps:
            return False
        first = max(kept)
        if first <= track.last_bad < end:
            self.counts["quarantined"] += 1
            return False
        xs = self._window(track, first, end)
        mask = np.arange(first, end) >= start
        state = [s.copy() for s in track.states[first]]
        self._keep(
            track, Chunk(sid, self._seq, first, state, xs, labels.astype(np.int64), mask, sequence=True)
        )
        return True

    def _keep(self, track: _Track, chunk: Chunk) -> None:
        """File a new (sane) chunk: held back for validation, or kept for training."""
        self._seq += 1
        if chunk.seq % self.validation_every == self.validation_every - 1:
            self._validation.append(chunk)
            self.counts["validation_chunks"] += 1
            return
        self._add_train(track, chunk)

    def _label_targets(
        self, track: _Track, loss_steps: range, labelled: list[bool]
    ) -> tuple[np.ndarray, np.ndarray]:
        example = next(track.labels[t] for t, ok in zip(loss_steps, labelled, strict=True) if ok)
        if np.ndim(example) == 0:  # class ids
            targets = np.full(self.k1, IGNORE_LABEL, dtype=np.int64)
        else:
            targets = np.zeros((self.k1, *np.shape(example)), dtype=np.float32)
        for j, (t, ok) in enumerate(zip(loss_steps, labelled, strict=True)):
            if ok:
                targets[j] = track.labels[t]
        return targets, np.array(labelled, dtype=bool)

    def _window(self, track: _Track, first: int, end: int) -> np.ndarray:
        """A copy of the inputs of steps ``[first, end)`` from the ring."""
        i0, n = first % self.history, end - first
        if i0 + n <= self.history:
            return track.inputs[i0 : i0 + n].copy()
        return track.inputs[np.arange(first, end) % self.history]

    def _bad_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """Which rows hold a non-finite or out-of-range value (``None`` for integer ids)."""
        if rows.dtype.kind != "f":
            return None
        flat = np.abs(rows.reshape(len(rows), -1))
        if flat.max(initial=0.0) <= self.max_abs_value:  # the common case, one reduction (NaN fails it)
            return None
        return ~(flat <= self.max_abs_value).all(axis=1)

    def _add_train(self, track: _Track, chunk: Chunk) -> None:
        self._train[chunk.seq] = chunk
        track.chunk_seqs.append(chunk.seq)
        self.counts["chunks"] += 1
        if len(track.chunk_seqs) > self.max_chunks_per_stream:
            self._train.pop(track.chunk_seqs.popleft(), None)
        while len(self._train) > self.max_chunks:
            _, old = self._train.popitem(last=False)
            old_track = self._tracks.get(old.stream_id)
            if old_track is not None and old_track.chunk_seqs and old_track.chunk_seqs[0] == old.seq:
                old_track.chunk_seqs.popleft()

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
            track = self._tracks.get(stream_id)
            if track is None:
                return 0
            if start is not None and start < 0:
                start += track.steps
            if end is not None and end < 0:
                end += track.steps
            if self.sequence_labels:
                return self._sequence_feedback(stream_id, track, label, start, end)
            end = track.steps if end is None else min(end, track.steps)
            start = end - 1 if start is None else start
            start = max(start, track.steps - self.history, 0)
            if end <= start:
                return 0
            value = np.asarray(label)
            stored: int | np.ndarray = int(value) if value.ndim == 0 else value.astype(np.float32)
            for t in range(start, end):
                track.labels[t] = stored
            self.counts["labels"] += end - start
            # Windows already complete are cut now (for the new labels only); later ones when they complete.
            first = max(0, (start - (self.k2 - self.k1)) // self.k1 * self.k1)
            new_steps = set(range(start, end))
            for s in range(first, end, self.k1):
                if s + self.k2 <= track.steps:
                    self._cut(stream_id, track, s, new_steps)
            return end - start

    def _sequence_feedback(
        self, sid: StreamId, track: _Track, label: object, start: int | None, end: int | None
    ) -> int:
        labels = np.asarray(label)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0:
            raise ValueError("a CTC label is a non-empty sequence of class ids")
        if start is None:
            raise ValueError("a CTC label needs the span it transcribes: start (and end, default: now)")
        end = track.steps if end is None else end
        if not 0 <= start < end <= track.steps:
            raise ValueError(f"span [{start}, {end}) is not within the stream's {track.steps} steps")
        if not self._cut_span(sid, track, start, end, labels):
            return 0  # fell out of history
        self.counts["labels"] += end - start
        return end - start

    def steps_of(self, stream_id: StreamId) -> int:
        """How many events of the stream were recorded (its next step's number); 0 if not tracked."""
        with self._lock:
            track = self._tracks.get(stream_id)
            return track.steps if track is not None else 0

    # ---- lifecycle of streams --------------------------------------------------------------------------
    def forget(self, stream_ids: Sequence[StreamId] | None = None) -> None:
        """Drop the history of streams whose state was reset or replaced (all when ``None``): a chunk may
        not span a state discontinuity. Chunks already cut stay."""
        with self._lock:
            if stream_ids is None:
                self._tracks.clear()
                return
            for sid in stream_ids:
                self._tracks.pop(sid, None)

    # ---- sampling (the worker) -----------------------------------------------------------------------
    def sample(self, batch_size: int, rng: random.Random) -> ChunkBatch | None:
        """Up to ``batch_size`` random training chunks, or ``None`` when there are none."""
        with self._lock:
            if not self._train:
                return None
            want = min(batch_size, len(self._train))
            # Draw arrival numbers between the oldest and newest kept chunk: O(batch), not O(buffer) (this
            # runs beside the step loop, under the GIL). Gaps (held back, evicted) are redrawn.
            low, high = next(iter(self._train)), self._seq - 1
            picked: dict[int, Chunk] = {}
            for _ in range(8 * want):
                seq = rng.randint(low, high)
                chunk = self._train.get(seq)
                if chunk is not None:
                    picked[seq] = chunk
                    if len(picked) == want:
                        break
            chunks = list(picked.values())
            if len(chunks) < want:  # sparse: fall back to a full draw
                chunks = rng.sample(list(self._train.values()), want)
        return ChunkBatch.stack(chunks)

    def validation_batch(self, max_size: int, since_seq: int = -1) -> ChunkBatch | None:
        """The newest held-back chunks (at most ``max_size``) that arrived after ``since_seq``."""
        with self._lock:
            chunks = list(
                itertools.takewhile(
                    lambda c: c.seq > since_seq, itertools.islice(reversed(self._validation), max_size)
                )
            )
        chunks.reverse()
        return ChunkBatch.stack(chunks) if chunks else None

    @property
    def next_seq(self) -> int:
        """The arrival number the next chunk will get."""
        return self._seq

    def __len__(self) -> int:
        return len(self._train)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                **self.counts,
                "tracked_streams": len(self._tracks),
                "train_chunks_held": len(self._train),
                "validation_chunks_held": len(self._validation),
            }
