"""``EngineSnapshot``: every stream's state, the model version and the source positions it reflects.

Saved as one safetensors file (raw tensors + a JSON header; nothing is unpickled on load).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from engine.errors import SnapshotError
from models.bundle import write_safetensors

SNAPSHOT_FORMAT = "rnnstream.snapshot/1"
StreamId = str | int


@dataclass
class EngineSnapshot:
    """States of ``stream_ids``: ``states[k]`` is ``(N, widths[k])`` float32 on CPU, rows aligned with
    ``stream_ids``. ``positions`` is whatever the sources report (e.g. Kafka partition → next offset)."""

    stream_ids: list[StreamId]
    states: list[Tensor]
    model_version: int = 0
    model_spec: dict[str, Any] = field(default_factory=dict)
    positions: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def __len__(self) -> int:
        return len(self.stream_ids)

    @property
    def widths(self) -> list[int]:
        return [t.shape[1] for t in self.states]

    def state_of(self, stream_id: StreamId) -> list[Tensor]:
        """One stream's state tensors ``[(width,), ...]``."""
        i = self.stream_ids.index(stream_id)
        return [t[i] for t in self.states]

    def save(self, path: str | Path) -> Path:
        """Write atomically (``models.bundle.write_safetensors``): a crash never leaves half a snapshot."""
        tensors = {f"state_{k}": t.contiguous() for k, t in enumerate(self.states)}
        meta = {
            "format": SNAPSHOT_FORMAT,
            "stream_ids": json.dumps(self.stream_ids),
            "model_version": str(self.model_version),
            "model_spec": json.dumps(self.model_spec),
            "positions": json.dumps(self.positions),
            "created_at": repr(self.created_at),
            "num_states": str(len(self.states)),
        }
        return write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> EngineSnapshot:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != SNAPSHOT_FORMAT:
                raise SnapshotError(f"{path}: format {meta.get('format')!r}, expected {SNAPSHOT_FORMAT!r}")
            tensors = load_file(str(path))
            states = [tensors[f"state_{k}"] for k in range(int(meta["num_states"]))]
            return cls(
                stream_ids=json.loads(meta["stream_ids"]),
                states=states,
                model_version=int(meta["model_version"]),
                model_spec=json.loads(meta["model_spec"]),
                positions=json.loads(meta["positions"]),
                created_at=float(meta["created_at"]),
            )
        except SnapshotError:
            raise
        except Exception as exc:
            raise SnapshotError(f"{path}: not a readable rnnstream snapshot ({exc})") from exc

    @classmethod
    def empty(cls, widths: list[int]) -> EngineSnapshot:
        return cls(stream_ids=[], states=[torch.zeros(0, w) for w in widths])
