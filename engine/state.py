"""The state store: every stream's recurrent state, one row per stream in per-layer tensors.

Layout: ``tensors[k]`` is ``(capacity, widths[k])`` on the engine's device, one tensor per entry of the
model's flat state list (``h`` per layer, plus ``c`` for LSTM). A stream id maps to a slot (row index).
New streams take a free slot initialised to the model's initial state. Capacity grows geometrically
(x2 while small, x1.25 past 64k rows so a million streams cost close to their raw size). Streams idle
past a TTL are evicted: dropped, or spilled to disk and restored on their next event.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from engine.errors import InvalidStreamIdError, UnknownStreamError
from engine.spill import SpillStore

StreamId = str | int

LARGE_CAPACITY = 65_536


def check_stream_ids(stream_ids: list[object]) -> list[StreamId]:
    """``stream_ids`` with every id checked by ``check_stream_id`` (fast when all are str or int)."""
    if set(map(type, stream_ids)) <= {str, int}:
        return stream_ids  # type: ignore[return-value]
    return [check_stream_id(s) for s in stream_ids]


def check_stream_id(stream_id: object) -> StreamId:
    """Return ``stream_id`` if it is a ``str`` or ``int`` (not ``bool``), else raise."""
    if isinstance(stream_id, str) or (isinstance(stream_id, int) and not isinstance(stream_id, bool)):
        return stream_id
    if isinstance(stream_id, np.integer):
        return int(stream_id)
    raise InvalidStreamIdError(f"stream id must be str or int, got {type(stream_id).__name__}: {stream_id!r}")


def grown_capacity(capacity: int, needed: int) -> int:
    """Next capacity >= ``needed``: doubling below ``LARGE_CAPACITY``, then +25% per growth."""
    while capacity < needed:
        capacity = capacity * 2 if capacity < LARGE_CAPACITY else capacity + capacity // 4
    return capacity


class StateStore:
    """Per-stream recurrent state in slot-indexed tensors.

    ``initial``: the model's initial state rows, one ``(width,)`` tensor per state tensor.
    ``ttl_s``: idle streams older than this are evicted by ``evict_idle``; None keeps them forever.
    ``spill``: where evicted states go; None drops them (their next event starts from the initial state).
    """

    def __init__(
        self,
        initial: Sequence[Tensor],
        device: torch.device,
        capacity: int = 1024,
        ttl_s: float | None = None,
        spill: SpillStore | None = None,
    ) -> None:
        self.device = device
        self.initial = [t.detach().to(device=device, dtype=torch.float32) for t in initial]
        self.widths = [t.shape[0] for t in self.initial]
        self.capacity = max(1, capacity)
        self.tensors = [self._fresh_rows(self.capacity, k) for k in range(len(self.widths))]
        self.slot_of: dict[StreamId, int] = {}
        self.id_at: list[StreamId | None] = [None] * self.capacity
        self.last_seen = np.zeros(self.capacity, dtype=np.float64)
        self.free: list[int] = list(range(self.capacity - 1, -1, -1))
        self.ttl_s = ttl_s
        self.spill = spill
        self.evictions = 0
        self.last_evicted: list[StreamId] = []  # ids of the latest eviction
        self.restored_from_spill = 0

    # ---- sizes ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, stream_id: StreamId) -> bool:
        return stream_id in self.slot_of or (self.spill is not None and stream_id in self.spill)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (all slots, used or free)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def row_bytes(self) -> int:
        """Raw bytes of one stream's state."""
        return sum(self.widths) * 4

    # ---- slots ---------------------------------------------------------------------------------------
    def slots_for(self, stream_ids: Sequence[StreamId]) -> np.ndarray:
        """Slots of ``stream_ids`` ``(N,) int64``, allocating (or restoring from spill) unknown streams."""
        found = list(map(self.slot_of.get, stream_ids))  # C-level loop: ~40 ns per event
        if None in found:
            for i, sid in enumerate(stream_ids):
                if found[i] is None:
                    found[i] = self.slot_of.get(sid)
                    if found[i] is None:
                        found[i] = self._admit(sid)
        return np.array(found, dtype=np.int64)

    def slot(self, stream_id: StreamId) -> int:
        """The slot of a known stream (restoring it from spill if needed), else ``UnknownStreamError``."""
        slot = self.slot_of.get(stream_id)
        if slot is not None:
            return slot
        if self.spill is not None and stream_id in self.spill:
            return self._admit(stream_id)
        raise UnknownStreamError(f"unknown stream {stream_id!r}: it has no state in this engine")

    def _admit(self, stream_id: StreamId) -> int:
        """Give a new slot to ``stream_id``: its spilled state if it has one, else the initial state."""
        check_stream_id(stream_id)
        if not self.free:
            self._grow(self.capacity + 1)
        slot = self.free.pop()
        self.slot_of[stream_id] = slot
        self.id_at[slot] = stream_id
        row = self.spill.pop(stream_id) if self.spill is not None else None
        if row is None:
            self._set_initial(slot)
        else:
            self._write_row(slot, torch.from_numpy(row))
            self.restored_from_spill += 1
        return slot

    def _grow(self, needed: int) -> None:
        new_cap = grown_capacity(self.capacity, needed)
        extra = new_cap - self.capacity
        self.tensors = [torch.cat([t, self._fresh_rows(extra, k)]) for k, t in enumerate(self.tensors)]
        self.id_at.extend([None] * extra)
        self.last_seen = np.concatenate([self.last_seen, np.zeros(extra)])
        self.free.extend(range(new_cap - 1, self.capacity - 1, -1))
        self.capacity = new_cap

    def _fresh_rows(self, n: int, k: int) -> Tensor:
        return self.initial[k].unsqueeze(0).repeat(n, 1)

    def _set_initial(self, slot: int) -> None:
        for t, init in zip(self.tensors, self.initial, strict=True):
            t[slot].copy_(init)

    # ---- state rows ----------------------------------------------------------------------------------
    def gather(self, slots: Tensor) -> list[Tensor]:
        """State rows at ``slots (B,) int64`` (on the device): one ``(B, width)`` tensor per state tensor."""
        return [t.index_select(0, slots) for t in self.tensors]

    def scatter(self, slots: Tensor, rows: Sequence[Tensor]) -> None:
        """Write ``rows`` (as from ``gather``) back at ``slots``; slots must be distinct."""
        for t, r in zip(self.tensors, rows, strict=True):
            t.index_copy_(0, slots, r)

    def touch(self, slots: np.ndarray, now: float) -> None:
        self.last_seen[slots] = now

    def read_row(self, slot: int) -> Tensor:
        """One stream's state tensors concatenated: ``(sum(widths),)`` float32 on CPU."""
        return torch.cat([t[slot] for t in self.tensors]).cpu()

    def _write_row(self, slot: int, row: Tensor) -> None:
        for t, part in zip(self.tensors, torch.split(row, self.widths), strict=True):
            t[slot].copy_(part)

    def reset(self, stream_id: StreamId) -> None:
        """Put ``stream_id`` back to the initial state (admitting it if new)."""
        slot = self.slot_of.get(stream_id)
        if slot is None:
            if self.spill is not None:
                self.spill.discard(stream_id)
            self._admit(stream_id)
        else:
            self._set_initial(slot)

    def release(self, stream_id: StreamId) -> None:
        """Forget ``stream_id``: free its slot (and any spilled copy)."""
        slot = self.slot_of.pop(stream_id, None)
        if self.spill is not None:
            self.spill.discard(stream_id)
        if slot is not None:
            self.id_at[slot] = None
            self.free.append(slot)

    # ---- eviction ------------------------------------------------------------------------------------
    def evict_idle(self, now: float | None = None) -> int:
        """Evict streams idle for longer than ``ttl_s`` (spill or drop); returns how many."""
        if self.ttl_s is None or not self.slot_of:
            return 0
        now = time.monotonic() if now is None else now
        idle = np.flatnonzero(self.last_seen < now - self.ttl_s)
        victims = [int(s) for s in idle if self.id_at[s] is not None]
        if not victims:
            return 0
        ids = [self.id_at[s] for s in victims]
        if self.spill is not None:
            idx = torch.as_tensor(victims, device=self.device)
            rows = torch.cat([t.index_select(0, idx) for t in self.tensors], dim=1).cpu().numpy()
            self.spill.put_many(ids, rows)
        self.last_evicted = ids
        for sid in ids:
            slot = self.slot_of.pop(sid)
            self.id_at[slot] = None
            self.free.append(slot)
        self.evictions += len(ids)
        return len(ids)

    # ---- export / import -----------------------------------------------------------------------------
    def export(self, stream_ids: Iterable[StreamId] | None = None) -> tuple[list[StreamId], list[Tensor]]:
        """Streams (all, or those of ``stream_ids`` that exist; in memory or spilled) with their state:
        ``ids`` and one ``(N, width)`` CPU tensor per state tensor, rows aligned with ``ids``."""
        if stream_ids is None:
            in_memory = list(self.slot_of)
            spilled = list(self.spill.items()) if self.spill is not None and len(self.spill) else []
        else:
            wanted = list(dict.fromkeys(stream_ids))
            in_memory = [s for s in wanted if s in self.slot_of]
            spilled = []
            if self.spill is not None:
                rows = ((s, self.spill.get(s)) for s in wanted if s not in self.slot_of)
                spilled = [(s, r) for s, r in rows if r is not None]
        idx = torch.as_tensor([self.slot_of[s] for s in in_memory], dtype=torch.int64, device=self.device)
        parts = [t.index_select(0, idx).cpu() for t in self.tensors]
        ids: list[StreamId] = in_memory
        if spilled:
            ids = ids + [s for s, _ in spilled]
            extra = torch.split(torch.from_numpy(np.stack([r for _, r in spilled])), self.widths, dim=1)
            parts = [torch.cat([p, e]) for p, e in zip(parts, extra, strict=True)]
        return ids, parts

    def import_(
        self, stream_ids: Iterable[StreamId], parts: Sequence[Tensor], now: float, replace: bool = True
    ) -> None:
        """Load ``stream_ids`` with their rows (as from ``export``). ``replace``: forget every other stream
        first; otherwise merge, overwriting the listed streams only."""
        ids = [check_stream_id(s) for s in stream_ids]
        if replace:
            self.clear()
        elif self.spill is not None:
            for sid in ids:
                self.spill.discard(sid)
        needed = len(self.slot_of) + len(ids)
        if needed > self.capacity:
            self._grow(needed)
        slots = self.slots_for(ids)
        idx = torch.as_tensor(slots, device=self.device)
        self.scatter(idx, [p.to(self.device, torch.float32) for p in parts])
        self.touch(slots, now)

    def clear(self) -> None:
        """Forget every stream (memory and spill)."""
        for sid in list(self.slot_of):
            self.release(sid)
        if self.spill is not None:
            self.spill.clear()
