"""State backends for sources that do not keep state themselves (everything but Kafka).

``LocalCheckpoint`` keeps every stream's checkpoint row (``rnnstream.pipeline.StateCodec``) in memory and,
at each checkpoint, writes all of them together with the source positions to one safetensors file,
atomically (``models.bundle.write_safetensors``). Each row carries its own state layout header (see
``engine.snapshot.StateLayout``), so the file needs none; rows may differ in length (a row written before
versioning beside a versioned one): ``rows`` is every row's bytes back to back and ``lengths`` their
lengths (``rnnstream.checkpoint/2``). A ``/1`` file (one fixed width, ``rows (N, width)``) still loads.

A restarted process reads it back: the streams resume from their states, a replayable source (CSV) from
its positions, and an at-least-once source (MQTT) redelivers what was not acknowledged, which the
reading checks drop when the state already holds it.

``EphemeralState`` keeps nothing: a restart starts every stream afresh (no ``checkpoint.dir`` configured).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from connectors.base import CheckpointFailed
from models.bundle import write_safetensors

CHECKPOINT_FORMAT = "rnnstream.checkpoint/2"
FIXED_WIDTH_FORMAT = "rnnstream.checkpoint/1"  # before versioning: rows (N, width) uint8


class CheckpointError(RuntimeError):
    """The checkpoint file exists but cannot be read (corrupt, another format, another model)."""


class LocalCheckpoint:
    """``StateBackend`` on one file, ``directory/state.safetensors``."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / "state.safetensors"
        self._rows: dict[int, dict[str, bytes]] = {}  # as saved last
        self._staged: dict[tuple[int, str], bytes | None] = {}  # written since
        self._positions: dict[str, Any] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                rows = _rows_of(f, meta.get("format"))
            ids = json.loads(meta["stream_ids"])
            partitions = json.loads(meta["partitions"])
            self._positions = json.loads(meta["positions"])
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None
        except Exception as exc:
            raise CheckpointError(f"{self.path}: unreadable checkpoint ({exc})") from exc
        for sid, p, row in zip(ids, partitions, rows, strict=True):
            self._rows.setdefault(p, {})[sid] = row

    def read(self, partitions: list[int]) -> dict[int, dict[str, bytes]]:
        return {p: dict(self._rows.get(p, {})) for p in partitions}

    def write(self, partition: int, stream_id: str, row: bytes | None) -> None:
        """Staged until ``save``; ``read`` returns what was saved."""
        self._staged[(partition, stream_id)] = row

    def save(self, positions: Mapping[str, Any]) -> None:
        """Every stream's row and ``positions``, in one atomic write. Raises ``CheckpointFailed`` when the
        file cannot be written (then the staged rows are dropped: the last save stays in force)."""
        staged, self._staged = self._staged, {}
        rows = {p: dict(t) for p, t in self._rows.items()}
        for (p, sid), row in staged.items():
            table = rows.setdefault(p, {})
            if row is None:
                table.pop(sid, None)
            else:
                table[sid] = row
        try:
            self._write(rows, dict(positions))
        except OSError as exc:
            raise CheckpointFailed(f"{self.path}: {exc}") from exc
        self._rows, self._positions = rows, dict(positions)

    def _write(self, tables: dict[int, dict[str, bytes]], positions: dict[str, Any]) -> None:
        ids, parts, rows = [], [], []
        for p, table in tables.items():
            ids.extend(table)
            parts.extend([p] * len(table))
            rows.extend(table.values())
        data = np.frombuffer(b"".join(rows), np.uint8)
        lengths = np.array([len(r) for r in rows], np.int64)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "stream_ids": json.dumps(ids),
            "partitions": json.dumps(parts),
            "positions": json.dumps(positions),
        }
        tensors = {"rows": torch.from_numpy(data.copy()), "lengths": torch.from_numpy(lengths)}
        write_safetensors(self.path, tensors, meta)

    def positions(self) -> dict[str, Any]:
        return dict(self._positions)


def _rows_of(f: Any, fmt: str | None) -> list[bytes]:
    """The rows of an open checkpoint file of format ``fmt`` (``CheckpointError`` for another format)."""
    if fmt == FIXED_WIDTH_FORMAT:
        return [row.tobytes() for row in f.get_tensor("rows").numpy()]
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"format {fmt!r}, not a checkpoint ({CHECKPOINT_FORMAT} or {FIXED_WIDTH_FORMAT})"
        )
    data, lengths = f.get_tensor("rows").numpy().tobytes(), f.get_tensor("lengths").numpy()
    ends = np.cumsum(lengths)
    if ends.size and (ends[-1] != len(data) or lengths.min() < 0):
        raise CheckpointError(f"row lengths add up to {ends[-1]} bytes, the rows hold {len(data)}")
    return [data[end - n : end] for end, n in zip(ends.tolist(), lengths.tolist(), strict=True)]


class EphemeralState:
    """``StateBackend`` that keeps nothing across restarts."""

    def read(self, partitions: list[int]) -> dict[int, dict[str, bytes]]:
        return {}

    def write(self, partition: int, stream_id: str, row: bytes | None) -> None:
        pass

    def save(self, positions: Mapping[str, Any]) -> None:
        pass

    def positions(self) -> dict[str, Any]:
        return {}
