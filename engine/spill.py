"""Spill store: state rows of evicted streams kept on disk, restored on the stream's next event.

One SQLite file (standard library, crash-safe, no server); each row holds one stream's state tensors
concatenated as raw little-endian float32 bytes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np

StreamId = str | int


def encode_id(stream_id: StreamId) -> str:
    """A stream id as a text key that keeps ``1`` and ``"1"`` apart."""
    return json.dumps(stream_id)


def decode_id(key: str) -> StreamId:
    return json.loads(key)


class SpillStore:
    """Evicted streams' states on disk. ``widths`` are the engine's state widths (floats per tensor)."""

    def __init__(self, path: str | Path, widths: list[int]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.widths = list(widths)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS spilled (id TEXT PRIMARY KEY, state BLOB NOT NULL)")
        self._keys = {row[0] for row in self._db.execute("SELECT id FROM spilled")}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, stream_id: StreamId) -> bool:
        return encode_id(stream_id) in self._keys

    def put_many(self, stream_ids: list[StreamId], rows: np.ndarray) -> None:
        """Store ``rows (N, sum(widths)) float32``, one per stream id, replacing older copies."""
        keys = [encode_id(s) for s in stream_ids]
        data = np.ascontiguousarray(rows, dtype="<f4")
        self._db.executemany(
            "INSERT OR REPLACE INTO spilled (id, state) VALUES (?, ?)",
            ((k, data[i].tobytes()) for i, k in enumerate(keys)),
        )
        self._keys.update(keys)

    def pop(self, stream_id: StreamId) -> np.ndarray | None:
        """Remove and return one stream's row ``(sum(widths),) float32``, or None if it is not here."""
        key = encode_id(stream_id)
        if key not in self._keys:
            return None
        row = self._db.execute("SELECT state FROM spilled WHERE id = ?", (key,)).fetchone()
        self._db.execute("DELETE FROM spilled WHERE id = ?", (key,))
        self._keys.discard(key)
        return None if row is None else np.frombuffer(row[0], dtype="<f4").copy()

    def get(self, stream_id: StreamId) -> np.ndarray | None:
        """One stream's row ``(sum(widths),) float32`` without removing it, or None."""
        key = encode_id(stream_id)
        if key not in self._keys:
            return None
        row = self._db.execute("SELECT state FROM spilled WHERE id = ?", (key,)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype="<f4").copy()

    def discard(self, stream_id: StreamId) -> bool:
        key = encode_id(stream_id)
        if key not in self._keys:
            return False
        self._db.execute("DELETE FROM spilled WHERE id = ?", (key,))
        self._keys.discard(key)
        return True

    def items(self) -> Iterator[tuple[StreamId, np.ndarray]]:
        """Every spilled stream and its row, without removing them."""
        for key, blob in self._db.execute("SELECT id, state FROM spilled"):
            yield decode_id(key), np.frombuffer(blob, dtype="<f4")

    def clear(self) -> None:
        self._db.execute("DELETE FROM spilled")
        self._keys.clear()

    def close(self) -> None:
        self._db.close()
