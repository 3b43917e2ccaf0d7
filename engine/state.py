"""The state store: every stream's recurrent state, one row per stream in paged per-layer tensors.

Layout: the rows live in *pages*; ``pages[p][k]`` is ``(rows_p, widths[k])`` on the engine's device, one
tensor per entry of the model's flat state list (``h`` per layer, plus ``c`` for LSTM). A stream id maps to
a slot (``engine.idmap.IdMap``, looked up a batch at a time); slot ``s`` is row ``s % page_rows`` of page
``s // page_rows``. Every page but the last holds
``page_rows`` rows. New streams take the lowest free slot, initialised to the model's initial state.

Growth never copies the whole state: the first page starts at ``capacity`` rows and doubles up to
``page_rows`` (a copy of at most one page), then each growth adds one fresh page. When streams go
(eviction, release, ``end``) and the others fit in all pages but the last with a quarter page to spare, the
last page's streams move into free slots below it and the page is freed, so memory comes back.

Limits: ``max_streams`` (streams held in memory) and ``max_bytes`` (bytes of the page tensors). A new
stream that would pass either evicts the least recently used stream the current call does not use
(spilled or dropped like an idle one, counted in ``evictions_for_capacity``); when no such stream is left
the new streams are refused with ``StreamCapacityError`` (counted in ``refused_streams``) and nothing
changes. Streams idle past a TTL are evicted too: dropped, or spilled to disk and restored on their next
event.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.batcher import NO_EVENT, plan_waves
from engine.errors import InvalidStreamIdError, StreamCapacityError, UnknownStreamError
from engine.idmap import IdMap, StreamId
from engine.spill import SpillStore

PAGE_ROWS = 16_384  # rows per page: 4 MiB per state tensor at hidden 64
EVICT_SHARE = 256  # a capacity eviction takes at least 1/256 of the streams held (see _admit_all)


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


def put_rows(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    """``dst[rows] = src`` for distinct ``rows (B,) int64``; ``src (B, ...)``, possibly strided. On the CPU
    through numpy's fancy assignment (~4x faster than ``index_copy_`` there), elsewhere ``index_copy_``."""
    if dst.device.type == "cpu" and not src.requires_grad:
        dst.numpy()[rows.numpy()] = src.numpy()
    else:
        dst.index_copy_(0, rows, src)


@dataclass(slots=True)
class Located:
    """Where ``size`` slots live: one ``(page, start, end, rows)`` part per page touched, for the slots
    ``[start, end)`` in page order, ``rows`` (device ``int64``) their rows in that page. Slots given in
    ascending order (as ``plan_waves(..., by_slot=True)`` makes them) are in page order already; others are
    sorted by ``order`` (device ``int64``; ``inverse`` undoes it), which costs two more copies."""

    parts: list[tuple[int, int, int, Tensor]]
    size: int
    order: Tensor | None = None
    inverse: Tensor | None = None


class StateStore:
    """Per-stream recurrent state in paged, slot-indexed tensors (see the module docstring).

    ``initial``: the model's initial state rows, one ``(width,)`` tensor per state tensor.
    ``ttl_s``: idle streams older than this are evicted by ``evict_idle``; None keeps them forever.
    ``spill``: where evicted states go; None drops them (their next event starts from the initial state).
    ``max_streams`` / ``max_bytes``: limits (None: none). ``page_rows``: rows per full page.
    ``on_drop``: called with the ids of streams evicted without a spill store (their history ends).
    """

    def __init__(
        self,
        initial: Sequence[Tensor],
        device: torch.device,
        capacity: int = 1024,
        ttl_s: float | None = None,
        spill: SpillStore | None = None,
        max_streams: int | None = None,
        max_bytes: int | None = None,
        page_rows: int = PAGE_ROWS,
    ) -> None:
        self.device = device
        self.initial = [t.detach().to(device=device, dtype=torch.float32) for t in initial]
        self.widths = [t.shape[0] for t in self.initial]
        self.page_rows = page_rows
        self.max_streams = max_streams
        self.max_bytes = max_bytes
        first = min(max(1, capacity), page_rows, self._budget_rows(0))
        if first < 1:
            raise ValueError(f"max_state_bytes={max_bytes} cannot hold one stream ({self.row_bytes()} bytes)")
        self.pages: list[list[Tensor]] = [self._fresh_page(first)]
        self.capacity = first
        self.slot_of = IdMap()  # stream id <-> slot
        self._wave_scratch = np.zeros(0, dtype=np.int64)
        self.last_seen = np.full(first, np.inf)  # inf: a free slot (never an eviction candidate)
        self.free: list[int] = list(range(first))  # a heap: the lowest free slot is taken first
        self.ttl_s = ttl_s
        self.spill = spill
        self.on_drop: Callable[[list[StreamId]], None] | None = None
        self.evictions = 0
        self.evictions_for_capacity = 0
        self.refused_streams = 0
        self.restored_from_spill = 0

    # ---- sizes ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, stream_id: StreamId) -> bool:
        return stream_id in self.slot_of or (self.spill is not None and stream_id in self.spill)

    @property
    def paged(self) -> bool:
        """More than one page: ``locate`` is cheapest on slots in ascending order."""
        return len(self.pages) > 1

    @property
    def tensors(self) -> list[Tensor]:
        """Every state tensor held, page by page."""
        return [t for page in self.pages for t in page]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (all pages, slots used or free)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def row_bytes(self) -> int:
        """Raw bytes of one stream's state."""
        return sum(self.widths) * 4

    def _budget_rows(self, held_bytes: int | None = None) -> int:
        """Rows ``max_bytes`` still allows beyond ``held_bytes`` (default: what the pages hold)."""
        if self.max_bytes is None:
            return sys.maxsize
        held = self.nbytes if held_bytes is None else held_bytes
        return max(0, (self.max_bytes - held) // self.row_bytes())

    # ---- pages ---------------------------------------------------------------------------------------
    def _fresh_page(self, rows: int) -> list[Tensor]:
        return [init.unsqueeze(0).repeat(rows, 1) for init in self.initial]

    def _grow(self) -> bool:
        """Room for at least one more slot: the last page doubles (up to ``page_rows``) if it is short,
        else a new page is added; existing pages are not copied. False if ``max_bytes`` forbids it."""
        last_rows = self.pages[-1][0].shape[0]
        budget = self._budget_rows()
        if last_rows < self.page_rows:
            added = min(self.page_rows, 2 * last_rows) - last_rows
        else:
            added = self.page_rows
        added = min(added, budget)
        if added < 1:
            return False
        fresh = self._fresh_page(added)
        if last_rows < self.page_rows:
            self.pages[-1] = [torch.cat([t, f]) for t, f in zip(self.pages[-1], fresh, strict=True)]
        else:
            self.pages.append(fresh)
        start = self.capacity
        self.capacity += added
        self.last_seen = np.concatenate([self.last_seen, np.full(added, np.inf)])
        self.free.extend(range(start, self.capacity))  # all above every heap entry: still a heap
        return True

    def _shrink(self) -> None:
        """Free the last page while the streams fit below it with a quarter page to spare, moving the
        last page's streams into the lowest free slots first (a copy of at most one page)."""
        while len(self.pages) > 1:
            start = (len(self.pages) - 1) * self.page_rows
            if len(self.slot_of) > start - self.page_rows // 4:
                return
            movers = self.slot_of.occupied(start, self.capacity)
            self.free = [s for s in self.free if s < start]
            heapq.heapify(self.free)
            targets = np.array([heapq.heappop(self.free) for _ in movers], dtype=np.int64)
            if len(movers):
                self.scatter(self.locate(targets), self.gather(self.locate(movers)))
                self.slot_of.move_slots(movers, targets)
                self.last_seen[targets] = self.last_seen[movers]
            self.pages.pop()
            self.capacity = start
            self.last_seen = self.last_seen[:start].copy()

    def locate(self, slots: np.ndarray | Tensor) -> Located:
        """Where ``slots (B,) int64`` live (for ``gather``/``scatter``); one part when one page holds them."""
        slots = np.asarray(slots.cpu() if isinstance(slots, Tensor) else slots, dtype=np.int64)
        n = len(slots)
        if len(self.pages) == 1:
            return Located([(0, 0, n, torch.from_numpy(slots).to(self.device))], n)
        page = slots // self.page_rows
        rows = slots - page * self.page_rows
        if n == 0 or page.min() == page.max():
            return Located([(int(page[0]) if n else 0, 0, n, torch.from_numpy(rows).to(self.device))], n)
        order = inverse = None
        if not (page[:-1] <= page[1:]).all():
            order = np.argsort(page, kind="stable")
            inverse = np.empty_like(order)
            inverse[order] = np.arange(n)
            page, rows = page[order], rows[order]
        dev_rows = torch.from_numpy(rows).to(self.device)
        bounds = [0, *(np.flatnonzero(np.diff(page)) + 1).tolist(), n]
        parts = [(int(page[a]), a, b, dev_rows[a:b]) for a, b in itertools.pairwise(bounds)]
        if order is None:
            return Located(parts, n)
        return Located(parts, n, *(torch.from_numpy(a).to(self.device) for a in (order, inverse)))

    # ---- slots ---------------------------------------------------------------------------------------
    def slots_for(self, stream_ids: Sequence[StreamId] | np.ndarray) -> np.ndarray:
        """Slots of ``stream_ids`` ``(N,) int64``, admitting (or restoring from spill) unknown streams.
        ``stream_ids``: a list, or an integer ``(N,)`` array (looked up without Python objects).
        ``StreamCapacityError`` (nothing changed) if some new streams cannot get a slot."""
        found = self.slot_of.lookup(stream_ids)
        missing = np.flatnonzero(found < 0)
        if len(missing):
            if isinstance(stream_ids, np.ndarray):
                missing_ids = stream_ids[missing].tolist()
            else:
                missing_ids = [stream_ids[i] for i in missing.tolist()]
            new = list(dict.fromkeys(missing_ids))
            admitted = self._admit_all(new, found[found >= 0], stream_ids)
            found[missing] = [admitted[s] for s in missing_ids]
        return found

    def slot(self, stream_id: StreamId) -> int:
        """The slot of a known stream (restoring it from spill if needed), else ``UnknownStreamError``."""
        slot = self.slot_of.get(stream_id)
        if slot is not None:
            return slot
        if self.spill is not None and stream_id in self.spill:
            return self._admit_all([stream_id], [], [stream_id])[stream_id]
        raise UnknownStreamError(f"unknown stream {stream_id!r}: it has no state in this engine")

    def _admit_all(
        self, new: list[StreamId], in_use: list[int], events: Sequence[StreamId]
    ) -> dict[StreamId, int]:
        """Slots for the ``new`` streams, evicting least recently used streams (not among the slots
        ``in_use`` by this call) where a limit requires it; refuses with ``StreamCapacityError`` (naming
        the events of ``events`` concerned) before changing anything if they cannot all fit."""
        for sid in new:
            check_stream_id(sid)
        live = len(self.slot_of)
        limit = sys.maxsize if self.max_streams is None else self.max_streams
        without_eviction = max(0, min(limit - live, len(self.free) + self._budget_rows()))
        if len(new) > without_eviction:
            protected = np.unique(np.asarray(in_use, dtype=np.int64))
            evictable = live - len(protected)
            if len(new) > without_eviction + evictable:
                self._refuse(new[without_eviction + evictable :], events)
            # At least 1/EVICT_SHARE of the streams held go at once, so the O(streams) search for the
            # least recently used runs once per that many new streams, not once per call.
            needed = len(new) - without_eviction
            self._evict_for_capacity(min(evictable, max(needed, live // EVICT_SHARE)), protected)
        return self._admit(new)

    def _refuse(self, refused: list[StreamId], events: Sequence[StreamId]) -> None:
        self.refused_streams += len(refused)
        which = set(refused)
        raise StreamCapacityError(
            f"{len(refused)} new stream(s) refused (first: {refused[0]!r}): the engine holds "
            f"{len(self.slot_of)} streams (max_streams={self.max_streams}, max_state_bytes={self.max_bytes}) "
            "and every other stream is in use by the same call",
            refused,
            [i for i, s in enumerate(events) if s in which],
        )

    def _admit(self, new: list[StreamId]) -> dict[StreamId, int]:
        """Give the lowest free slots to the ``new`` streams (distinct, unknown): each its spilled state if
        it has one, else the initial state."""
        while len(self.free) < len(new):
            if not self._grow():
                raise StreamCapacityError(f"no slot for {len(new)} new streams", new, [])  # a bug if seen
        slots = np.array([heapq.heappop(self.free) for _ in new], dtype=np.int64)
        self.slot_of.add_many(new, slots)
        self.last_seen[slots] = time.monotonic()
        if len(new):
            self.scatter(self.locate(slots), [init.expand(len(new), -1) for init in self.initial])
        if self.spill is not None and len(self.spill):
            for sid, slot in zip(new, slots.tolist(), strict=True):
                row = self.spill.pop(sid)
                if row is not None:
                    self._write_row(slot, torch.from_numpy(row))
                    self.restored_from_spill += 1
        return dict(zip(new, slots.tolist(), strict=True))

    def _free_slots(self, slots: np.ndarray) -> list[StreamId]:
        """Free ``slots (N,) int64`` (each holding a stream); returns their streams."""
        ids = self.slot_of.remove_slots(slots)
        self.last_seen[slots] = np.inf
        for slot in slots.tolist():
            heapq.heappush(self.free, slot)
        return ids

    def rows_at(self, slot: int) -> list[Tensor]:
        """One stream's state as ``(1, width)`` views, one per state tensor."""
        page, row = divmod(slot, self.page_rows)
        return [t[row : row + 1] for t in self.pages[page]]

    def _set_initial(self, slot: int) -> None:
        for t, init in zip(self.rows_at(slot), self.initial, strict=True):
            t[0].copy_(init)

    # ---- state rows ----------------------------------------------------------------------------------
    def gather(self, where: Located | np.ndarray | Tensor) -> list[Tensor]:
        """State rows at ``where`` (as from ``locate``, or the slots themselves): one ``(B, width)``
        tensor per state tensor."""
        loc = where if isinstance(where, Located) else self.locate(where)
        if len(loc.parts) == 1:
            page, _, _, rows = loc.parts[0]
            return [t.index_select(0, rows) for t in self.pages[page]]
        out = []
        for k, w in enumerate(self.widths):
            by_page = torch.empty(loc.size, w, device=self.device)
            for page, a, b, rows in loc.parts:
                torch.index_select(self.pages[page][k], 0, rows, out=by_page[a:b])
            out.append(by_page if loc.inverse is None else by_page.index_select(0, loc.inverse))
        return out

    def scatter(self, where: Located | np.ndarray | Tensor, rows: Sequence[Tensor]) -> None:
        """Write ``rows`` (as from ``gather``) back at ``where``; the slots must be distinct."""
        loc = where if isinstance(where, Located) else self.locate(where)
        for k, r in enumerate(rows):
            by_page = r if loc.order is None else r.index_select(0, loc.order)
            for page, a, b, page_rows in loc.parts:
                put_rows(self.pages[page][k], page_rows, by_page[a:b])

    def waves(self, slots: np.ndarray) -> list[np.ndarray]:
        """``plan_waves`` of events at ``slots (N,) int64``, in O(N) a wave (a scratch array as long as the
        store); by slot when paged."""
        if len(self._wave_scratch) < self.capacity:
            self._wave_scratch = np.full(self.capacity, NO_EVENT, dtype=np.int64)
        return plan_waves(slots, by_slot=self.paged, scratch=self._wave_scratch)

    def touch(self, slots: np.ndarray, now: float) -> None:
        self.last_seen[slots] = now

    def read_row(self, slot: int) -> Tensor:
        """One stream's state tensors concatenated: ``(sum(widths),)`` float32 on CPU."""
        return torch.cat([t[0] for t in self.rows_at(slot)]).cpu()

    def _write_row(self, slot: int, row: Tensor) -> None:
        for t, part in zip(self.rows_at(slot), torch.split(row, self.widths), strict=True):
            t[0].copy_(part)

    def reset(self, stream_id: StreamId) -> None:
        """Put ``stream_id`` back to the initial state (admitting it if new)."""
        slot = self.slot_of.get(stream_id)
        if slot is None:
            self._admit_all([stream_id], [], [stream_id])
            slot = self.slot_of[stream_id]
        self._set_initial(slot)

    def release(self, stream_id: StreamId) -> None:
        """Forget ``stream_id``: free its slot (and any spilled copy)."""
        slot = self.slot_of.get(stream_id)
        if self.spill is not None:
            self.spill.discard(stream_id)
        if slot is not None:
            self._free_slots(np.array([slot], dtype=np.int64))
            self._shrink()

    # ---- eviction ------------------------------------------------------------------------------------
    def evict_idle(self, now: float | None = None) -> int:
        """Evict streams idle for longer than ``ttl_s`` (spill or drop); returns how many."""
        if self.ttl_s is None or not self.slot_of:
            return 0
        now = time.monotonic() if now is None else now
        victims = np.flatnonzero(self.last_seen < now - self.ttl_s)  # free slots hold inf
        if not len(victims):
            return 0
        self._evict(victims)
        self._shrink()
        return len(victims)

    def _evict_for_capacity(self, n: int, protected: np.ndarray) -> None:
        """Evict the ``n`` least recently used streams whose slots are not ``protected``."""
        seen = self.last_seen
        saved = seen[protected]
        seen[protected] = np.inf  # free slots hold inf too: never chosen
        try:
            victims = np.argpartition(seen, n - 1)[:n]
        finally:
            seen[protected] = saved
        self._evict(victims)
        self.evictions_for_capacity += n

    def _evict(self, victims: np.ndarray) -> None:
        """Spill (or drop) the streams at ``victims`` and free their slots."""
        victims = np.asarray(victims, dtype=np.int64)
        ids = self.slot_of.ids_at(victims)
        if self.spill is not None:
            rows = torch.cat(self.gather(victims), dim=1).cpu().numpy()
            self.spill.put_many(ids, rows)
        elif self.on_drop is not None:
            self.on_drop(ids)
        self._free_slots(victims)
        self.evictions += len(ids)

    # ---- export / import -----------------------------------------------------------------------------
    def export(self, stream_ids: Iterable[StreamId] | None = None) -> tuple[list[StreamId], list[Tensor]]:
        """Streams (all, or those of ``stream_ids`` that exist; in memory or spilled) with their state:
        ``ids`` and one ``(N, width)`` CPU tensor per state tensor, rows aligned with ``ids``."""
        if stream_ids is None:
            slots = self.slot_of.occupied(0, self.capacity)
            in_memory = self.slot_of.ids_at(slots)
            spilled = list(self.spill.items()) if self.spill is not None and len(self.spill) else []
        else:
            wanted = list(dict.fromkeys(stream_ids))
            known = self.slot_of.lookup(wanted)
            in_memory = [s for s, k in zip(wanted, known.tolist(), strict=True) if k >= 0]
            slots = known[known >= 0]
            spilled = []
            if self.spill is not None:
                rows = ((s, self.spill.get(s)) for s, k in zip(wanted, known.tolist(), strict=True) if k < 0)
                spilled = [(s, r) for s, r in rows if r is not None]
        parts = [p.cpu() for p in self.gather(slots)]
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
        first; otherwise merge, overwriting the listed streams only (others may be evicted to make room).
        ``StreamCapacityError`` (nothing changed) if the limits cannot hold them."""
        ids = [check_stream_id(s) for s in stream_ids]
        if replace:
            fits = min(self.max_streams or sys.maxsize, self._budget_rows(0))
            if len(set(ids)) > fits:
                self._refuse(list(dict.fromkeys(ids))[fits:], ids)
            self.clear()
        slots = self.slots_for(ids)
        self.scatter(slots, [p.to(self.device, torch.float32) for p in parts])
        self.touch(slots, now)

    def clear(self) -> None:
        """Forget every stream (memory and spill); keep only the first page."""
        del self.pages[1:]
        self.capacity = self.pages[0][0].shape[0]
        self.slot_of.clear()
        self.last_seen = np.full(self.capacity, np.inf)
        self.free = list(range(self.capacity))
        if self.spill is not None:
            self.spill.clear()
