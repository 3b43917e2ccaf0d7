"""``EngineSnapshot``: every stream's state, the model version and the source positions it reflects, and
``StateLayout``: what a stream's state row means, stamped into every state record the project writes.

A snapshot is one safetensors file (raw tensors + a JSON header; nothing is unpickled on load). Its header
holds the ``StateLayout`` (``rnnstream.snapshot/2``); a ``rnnstream.snapshot/1`` file (written before
versioning) has none, and its layout is read from the model spec and state widths it recorded.

Checkpoint rows (``rnnstream.pipeline.StateCodec``: the Kafka changelog's values, the local checkpoint's
rows) start with ``StateLayout.row_header()``. Two models with equal layouts take each other's states:
new weights (a fine-tuned version), a new ``ModelSpec`` field with a default, another head. A different
cell kind, layer count, state width or dtype is refused, naming both layouts.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from engine.errors import SnapshotError
from models.bundle import write_safetensors

if TYPE_CHECKING:
    from models.stream_model import StreamModel

SNAPSHOT_FORMAT = "rnnstream.snapshot/2"
SNAPSHOT_FORMATS = ("rnnstream.snapshot/1", SNAPSHOT_FORMAT)  # /1: no layout header (before versioning)
STATE_RECORD_VERSION = 2  # of the layout header, in rows and snapshot files (2: extra state tensors)
StreamId = str | int

# Row header: magic, record version, cell code, dtype code, layers, state tensors per layer (9 bytes), then
# one little-endian uint32 width per state tensor. As float32 the magic is a NaN, which no engine state
# holds: a row written before versioning never starts with it. Version 2 (written only by a layout with
# extra state, so plain layouts keep writing version 1 byte for byte) follows with one byte, the number of
# extras, and per extra its code (one byte) and width (uint32).
ROW_MAGIC = b"RS\xc1\x7f"
_FIXED = struct.Struct("<4sBBBBB")
_CELL_CODES = {"rnn_tanh": 1, "rnn_relu": 2, "gru": 3, "lstm": 4}  # fixed forever: stored in records
_DTYPE_CODES = {"float32": 1}
# Extra per-stream state beside the recurrent layers' (fixed forever: stored in records):
EXTRA_CODES = {
    "attention_states": 1,  # the ring of the last K top-layer states, (K * H_top,)
    "attention_fill": 2,  # [next ring row, rows filled]
    "utterance_frames": 3,  # an utterance's buffered inputs, (max_frames * F,)
    "utterance_length": 4,  # [frames buffered, frames refused past the bound]
}
_EXTRA = struct.Struct("<BI")


class StateLayoutError(SnapshotError):
    """State records written by another state layout (or a newer record version): they cannot load."""


@dataclass(frozen=True)
class StateLayout:
    """The meaning of a stream's state: ``cell`` kind, per layer the widths of its state tensors (``(h,)``,
    or ``(h, c)`` for LSTM: floats each), their ``dtype``, and ``extras``: named state tensors after the
    layers' (``(name, width)``, names from ``EXTRA_CODES``: an attention ring, a buffered utterance).
    Equal layouts = interchangeable states."""

    cell: str
    layers: tuple[tuple[int, ...], ...]
    dtype: str = "float32"
    extras: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        unknown = [name for name, _ in self.extras if name not in EXTRA_CODES]
        if unknown:
            raise ValueError(f"unknown extra state {unknown}; known: {sorted(EXTRA_CODES)}")

    @classmethod
    def grouped(cls, cell: str, num_layers: int, widths: list[int], dtype: str = "float32") -> StateLayout:
        """From the flat state widths (layer by layer) of a ``num_layers``-layer model."""
        per = max(len(widths) // max(num_layers, 1), 1)
        return cls(cell, tuple(tuple(widths[i : i + per]) for i in range(0, len(widths), per)), dtype)

    @property
    def widths(self) -> list[int]:
        """The flat state widths, layer by layer, then the extras (``StreamModel.state_widths()``)."""
        return [w for layer in self.layers for w in layer] + [w for _, w in self.extras]

    def describe(self) -> str:
        """``gru 2x16``, ``lstm 2x(h 3, c 8)``, or each layer when they differ; then any extras
        (``+ attention_states 512``)."""
        sizes = [self._size(layer) for layer in self.layers]
        if not sizes:
            shape = "0 layers"
        else:
            shape = f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else f"[{', '.join(sizes)}]"
        extras = "".join(f" + {name} {w}" for name, w in self.extras)
        return f"{self.cell} {shape}{extras}" + ("" if self.dtype == "float32" else f" {self.dtype}")

    @staticmethod
    def _size(layer: tuple[int, ...]) -> str:
        if len(set(layer)) == 1:
            return str(layer[0])
        return "(" + ", ".join(f"{n} {w}" for n, w in zip("hc", layer, strict=False)) + ")"

    def differences(self, other: StateLayout) -> list[str]:
        """What differs from ``other``, as ``what: mine vs theirs``."""
        pairs = [
            ("cell", self.cell, other.cell),
            ("layers", len(self.layers), len(other.layers)),
            ("state widths", self.widths, other.widths),
            ("dtype", self.dtype, other.dtype),
            ("extra state", list(self.extras), list(other.extras)),
        ]
        return [f"{what}: {a} vs {b}" for what, a, b in pairs if a != b]

    def check_loads_into(self, target: StateLayout) -> None:
        """Raise ``StateLayoutError`` naming both layouts and what differs, unless they are equal."""
        if self != target:
            raise StateLayoutError(
                f"state written by {self.describe()} cannot load into {target.describe()} "
                f"({'; '.join(self.differences(target))})"
            )

    # ---- serialised: JSON (snapshot files), bytes (checkpoint rows) --------------------------------------
    def to_dict(self) -> dict[str, Any]:
        layers = [list(layer) for layer in self.layers]
        out: dict[str, Any] = {
            "record_version": self.record_version,
            "cell": self.cell,
            "layers": layers,
            "dtype": self.dtype,
        }
        if self.extras:
            out["extras"] = [list(extra) for extra in self.extras]
        return out

    @property
    def record_version(self) -> int:
        """1 for a layout without extras (as written before they existed), else 2."""
        return 2 if self.extras else 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StateLayout:
        """Inverse of ``to_dict``; keys added by later releases are ignored, a newer record version is
        refused (``StateLayoutError``)."""
        _check_version(int(data["record_version"]))
        return cls(
            str(data["cell"]),
            tuple(tuple(int(w) for w in layer) for layer in data["layers"]),
            data["dtype"],
            tuple((str(name), int(w)) for name, w in data.get("extras", ())),
        )

    def row_header(self) -> bytes:
        """The header every checkpoint row of this layout starts with: ``9 + 4 * len(layer widths)``
        bytes, and with extras ``1 + 5 * len(extras)`` more."""
        per = len(self.layers[0]) if self.layers else 0
        fixed = _FIXED.pack(
            ROW_MAGIC,
            self.record_version,
            _CELL_CODES[self.cell],
            _DTYPE_CODES[self.dtype],
            len(self.layers),
            per,
        )
        layer_widths = [w for layer in self.layers for w in layer]
        header = fixed + struct.pack(f"<{len(layer_widths)}I", *layer_widths)
        if not self.extras:
            return header
        extras = b"".join(_EXTRA.pack(EXTRA_CODES[name], w) for name, w in self.extras)
        return header + bytes([len(self.extras)]) + extras

    @classmethod
    def from_row(cls, row: bytes) -> tuple[StateLayout, int] | None:
        """``(layout, header length)`` of a row that starts with a header; ``None`` for a row written
        before versioning. Raises ``StateLayoutError`` for a newer record version, ``ValueError`` for a
        header that cannot be read."""
        if not row.startswith(ROW_MAGIC):
            return None
        if len(row) < _FIXED.size:
            raise ValueError(f"state row of {len(row)} bytes: a cut header")
        _magic, version, cell, dtype, layers, per = _FIXED.unpack_from(row)
        _check_version(version)
        end = _FIXED.size + 4 * layers * per
        names = {c: n for n, c in _CELL_CODES.items()}, {c: n for n, c in _DTYPE_CODES.items()}
        empty = version == 1 and not layers * per  # version 2 may hold extras alone
        if cell not in names[0] or dtype not in names[1] or empty or len(row) < end:
            raise ValueError(
                f"state row of {len(row)} bytes: unreadable header (cell {cell}, dtype {dtype}, "
                f"{layers} layers of {per} tensors)"
            )
        widths = list(struct.unpack_from(f"<{layers * per}I", row, _FIXED.size))
        layout = cls.grouped(names[0][cell], layers, widths, names[1][dtype])
        if version == 1:
            return layout, end
        extras, end = _read_extras(row, end)
        if not extras and not layers * per:
            raise ValueError(f"state row of {len(row)} bytes: a version 2 header with no state")
        return cls(layout.cell, layout.layers, layout.dtype, extras), end


def _read_extras(row: bytes, at: int) -> tuple[tuple[tuple[str, int], ...], int]:
    """The extras of a version 2 header starting at ``at``, and where the header ends."""
    if len(row) < at + 1:
        raise ValueError(f"state row of {len(row)} bytes: a cut header")
    count, at = row[at], at + 1
    end = at + _EXTRA.size * count
    if len(row) < end:
        raise ValueError(f"state row of {len(row)} bytes: a cut header ({count} extra states)")
    names = {c: n for n, c in EXTRA_CODES.items()}
    extras = []
    for code, width in (_EXTRA.unpack_from(row, at + _EXTRA.size * i) for i in range(count)):
        if code not in names:
            raise ValueError(f"state row: unknown extra state code {code}")
        extras.append((names[code], width))
    return tuple(extras), end


def _check_version(version: int) -> None:
    """``ValueError`` for a version that never existed, ``StateLayoutError`` for a newer one."""
    if version < 1:
        raise ValueError(f"state record version {version} does not exist")
    if version > STATE_RECORD_VERSION:
        raise StateLayoutError(
            f"state record version {version}: this release reads versions 1 to {STATE_RECORD_VERSION}"
        )


def state_layout(model: StreamModel) -> StateLayout:
    """The state layout of ``model``: the one identity every state record is stamped and checked with
    (``layer_state_widths()``: per layer the widths of its state tensors; ``extra_states()``: named state
    tensors after them)."""
    layers = tuple(tuple(widths) for widths in model.layer_state_widths())
    return StateLayout(model.spec.cell, layers, extras=tuple(model.extra_states()))


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
    layout: StateLayout | None = None  # default: from ``model_spec`` and the state widths, when given

    def __post_init__(self) -> None:
        if self.layout is None and self.model_spec:
            spec = self.model_spec
            self.layout = StateLayout.grouped(spec["cell"], int(spec.get("num_layers", 1)), self.widths)

    def __len__(self) -> int:
        return len(self.stream_ids)

    @property
    def widths(self) -> list[int]:
        return [t.shape[1] for t in self.states]

    def state_of(self, stream_id: StreamId) -> list[Tensor]:
        """One stream's state tensors ``[(width,), ...]``."""
        i = self.stream_ids.index(stream_id)
        return [t[i] for t in self.states]

    def check_fits(self, target: StateLayout) -> None:
        """Raise ``SnapshotError`` unless these states can load into a model of layout ``target``
        (``StateLayoutError`` naming both layouts; a snapshot without a layout: its widths must fit)."""
        if self.layout is not None:
            self.layout.check_loads_into(target)
        elif self.widths != target.widths:
            raise SnapshotError(
                f"snapshot state widths {self.widths} do not fit this model's {target.widths}"
            )

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
        if self.layout is not None:
            meta["state_layout"] = json.dumps(self.layout.to_dict())
        return write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> EngineSnapshot:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") not in SNAPSHOT_FORMATS:
                raise SnapshotError(
                    f"{path}: format {meta.get('format')!r}, expected one of {SNAPSHOT_FORMATS}"
                )
            layout = meta.get("state_layout")
            tensors = load_file(str(path))
            states = [tensors[f"state_{k}"] for k in range(int(meta["num_states"]))]
            return cls(
                stream_ids=json.loads(meta["stream_ids"]),
                states=states,
                model_version=int(meta["model_version"]),
                model_spec=json.loads(meta["model_spec"]),
                positions=json.loads(meta["positions"]),
                created_at=float(meta["created_at"]),
                layout=StateLayout.from_dict(json.loads(layout)) if layout else None,
            )
        except SnapshotError:
            raise
        except Exception as exc:
            raise SnapshotError(f"{path}: not a readable rnnstream snapshot ({exc})") from exc

    @classmethod
    def empty(cls, widths: list[int]) -> EngineSnapshot:
        return cls(stream_ids=[], states=[torch.zeros(0, w) for w in widths])
