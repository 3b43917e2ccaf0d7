"""Spill store: state rows of evicted streams kept on disk, restored on the stream's next event.

One SQLite file (standard library, no server); each row holds one stream's state tensors concatenated as
raw little-endian float32 bytes.

The spill store is a cache of *this process's* live state, never a source of truth across restarts: a
stream spilled after the last checkpoint holds state that the checkpoint (and the committed source
positions) do not, so reloading it after a crash would apply the replayed events twice. Each store
therefore opens a fresh file of its own (``spill-<pid>-<random>.sqlite``) in the spill directory, holds an
exclusive ``flock`` on it while open, and deletes it on close; files left behind by a crashed process
(no lock held) are deleted when the next store opens in that directory. Checkpoints hold spilled streams
because ``Engine.snapshot`` exports them with the in-memory ones.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

StreamId = str | int


def encode_id(stream_id: StreamId) -> str:
    """A stream id as a text key that keeps ``1`` and ``"1"`` apart."""
    return json.dumps(stream_id)


def decode_id(key: str) -> StreamId:
    return json.loads(key)


def _sidecars(path: Path) -> list[Path]:
    """An SQLite file and its journal files."""
    return [path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]


def _unlink(path: Path) -> None:
    for p in _sidecars(path):
        p.unlink(missing_ok=True)


def remove_stale_spills(directory: Path) -> list[Path]:
    """Delete the spill files in ``directory`` that no open store holds (left by a crashed process, or
    by versions that kept one shared ``spill.sqlite``); returns them."""
    removed = []
    for path in sorted(directory.glob("spill*.sqlite")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live store holds it
        finally:
            os.close(fd)  # releases the lock we may have taken
        _unlink(path)
        removed.append(path)
    return removed


class SpillStore:
    """Evicted streams' states on disk, in a fresh file of this store's own inside ``directory`` (see
    the module docstring). ``widths`` are the engine's state widths (floats per tensor)."""

    def __init__(self, directory: str | Path, widths: list[int]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_spills(directory)
        self.path = directory / f"spill-{os.getpid()}-{uuid.uuid4().hex[:12]}.sqlite"
        self.widths = list(widths)
        self._lock_fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")  # a cache: nothing in it has to survive a crash
        self._db.execute("CREATE TABLE spilled (id TEXT PRIMARY KEY, state BLOB NOT NULL)")
        self._keys: set[str] = set()

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
        """Close and delete the file (idempotent)."""
        if self._lock_fd < 0:
            return
        self._db.close()
        _unlink(self.path)
        os.close(self._lock_fd)
        self._lock_fd = -1
