"""``StreamTable``: a fixed-width float64 row of bookkeeping per stream, for the pipeline's stages.

The reading checks (last timestamp, flat-line count) and the scorers (running normalisation, error
statistics) keep a few numbers per stream next to the engine's hidden state. Rows live in one
``(capacity, width)`` array so a batch is updated with vectorised numpy indexing; they are checkpointed
with the engine state (``export``/``load``) and forgotten with it (``drop``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StreamTable:
    """Rows of ``width`` float64 values, one per stream; a new stream's row starts as ``initial``."""

    def __init__(self, width: int, initial: np.ndarray | None = None, capacity: int = 1024) -> None:
        self.width = width
        self.initial = np.zeros(width) if initial is None else np.asarray(initial, np.float64)
        self.rows = np.zeros((capacity, width))
        self._index: dict[str, int] = {}
        self._free: list[int] = list(range(capacity - 1, -1, -1))  # lowest index handed out first

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._index

    def index(self, stream_id: str) -> int:
        """Row index of one stream; an unknown stream gets a fresh row."""
        i = self._index.get(stream_id)
        return self._admit(stream_id) if i is None else i

    def indices(self, stream_ids: Sequence[str]) -> np.ndarray:
        """Row index of each stream ``(N,) int64``; unknown streams get a fresh row."""
        index = self._index
        out = np.empty(len(stream_ids), np.int64)
        for k, sid in enumerate(stream_ids):
            i = index.get(sid)
            out[k] = self._admit(sid) if i is None else i
        return out

    def _admit(self, stream_id: str) -> int:
        if not self._free:
            old = len(self.rows)
            self.rows = np.concatenate([self.rows, np.zeros((old, self.width))])
            self._free.extend(range(2 * old - 1, old - 1, -1))
        i = self._free.pop()
        self.rows[i] = self.initial
        self._index[stream_id] = i
        return i

    def reset(self, stream_ids: Sequence[str]) -> None:
        """Back to ``initial`` (a restarted stream)."""
        rows = self.indices(stream_ids)  # first: admitting a stream may replace ``self.rows``
        self.rows[rows] = self.initial

    def export(self, stream_ids: Sequence[str]) -> np.ndarray:
        """The rows of ``stream_ids`` ``(N, width)`` (``initial`` for unknown streams)."""
        out = np.tile(self.initial, (len(stream_ids), 1))
        for k, sid in enumerate(stream_ids):
            i = self._index.get(sid)
            if i is not None:
                out[k] = self.rows[i]
        return out

    def load(self, stream_ids: Sequence[str], rows: np.ndarray) -> None:
        """Set the rows of ``stream_ids`` from ``rows (N, width)``."""
        if len(stream_ids):
            at = self.indices(stream_ids)  # first: admitting a stream may replace ``self.rows``
            self.rows[at] = rows

    def drop(self, stream_ids: Sequence[str]) -> None:
        for sid in stream_ids:
            i = self._index.pop(sid, None)
            if i is not None:
                self._free.append(i)


class StreamDict:
    """``StreamTable``'s interface on a ``dict`` of Python lists: cheaper for a stage that touches one
    stream's few numbers per reading in plain Python (the reading checks)."""

    def __init__(self, width: int, initial: np.ndarray | None = None) -> None:
        self.width = width
        self.initial = np.zeros(width) if initial is None else np.asarray(initial, np.float64)
        self._initial_row = self.initial.tolist()
        self.rows: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self.rows

    def row(self, stream_id: str) -> list[float]:
        """The stream's row, to read and update in place; an unknown stream gets a fresh one."""
        row = self.rows.get(stream_id)
        if row is None:
            row = self.rows[stream_id] = list(self._initial_row)
        return row

    def reset(self, stream_ids: Sequence[str]) -> None:
        for sid in stream_ids:
            self.rows[sid] = list(self._initial_row)

    def export(self, stream_ids: Sequence[str]) -> np.ndarray:
        initial = self._initial_row
        return np.array([self.rows.get(sid, initial) for sid in stream_ids], np.float64).reshape(
            -1, self.width
        )

    def load(self, stream_ids: Sequence[str], rows: np.ndarray) -> None:
        for sid, row in zip(stream_ids, rows.tolist(), strict=True):
            self.rows[sid] = row

    def drop(self, stream_ids: Sequence[str]) -> None:
        for sid in stream_ids:
            self.rows.pop(sid, None)
