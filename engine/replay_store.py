"""The replay buffer's chunk store: fixed-size arrays, optionally shared with the worker process.

A chunk is one row of each array (no per-chunk object): ``seq`` (its arrival number, ``-1`` when the row is
free), ``start`` (stream-local step of its first input), ``xs (T, ...)`` inputs, ``xs_len``, ``targets (L,
...)``, ``target_len``, ``mask (M,)`` and one ``state_j (width_j,)`` per state tensor. ``T = k2``, ``L = M
= k1`` for TBPTT chunks; for span chunks (CTC) ``T = M = L = history`` and the lengths say how much of a
row is used.

The arrays live in one memory file (``memfd`` on Linux, else an unlinked temporary file), so the fine-tuning
worker maps the same pages read-only and samples batches itself: nothing is sampled, stacked or pickled in
the serving process. Pages are committed only when written (rows are used lowest first), so capacity costs
address space, not memory.

Readers never lock: the writer frees a row by setting ``seq = -1`` first and fills a row before writing
its ``seq``, and a reader keeps only rows whose ``seq`` was the same (and not ``-1``) before and after it
copied them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER = ("next_seq", "train_high", "validation_count", "train_count")
"""Counters at the start of the file (int64 each): the arrival number the next chunk gets; one past the
highest train row ever used; validation chunks written so far (the ring position); train chunks held."""


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and dtypes of a store: picklable, sent to the worker so it can map the same file.

    ``feature_shape``/``input_dtype``: one event's input; ``target_shape``/``target_dtype``: one step's
    target (``()`` int64 for class ids); ``steps``: ``T``; ``target_steps``: ``L``; ``mask_steps``: ``M``;
    ``state_widths``/``state_dtype``: the flat state; ``train``/``validation``: rows of each part;
    ``sequence``: span chunks (CTC)."""

    feature_shape: tuple[int, ...]
    input_dtype: str
    target_shape: tuple[int, ...]
    target_dtype: str
    steps: int
    target_steps: int
    mask_steps: int
    state_widths: tuple[int, ...]
    state_dtype: str
    train: int
    validation: int
    sequence: bool = False

    def fields(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """``(name, per-row shape, dtype)`` of each array."""
        out: list[tuple[str, tuple[int, ...], np.dtype]] = [
            ("seq", (), np.dtype(np.int64)),
            ("start", (), np.dtype(np.int64)),
            ("xs_len", (), np.dtype(np.int32)),
            ("target_len", (), np.dtype(np.int32)),
            ("xs", (self.steps, *self.feature_shape), np.dtype(self.input_dtype)),
            ("targets", (self.target_steps, *self.target_shape), np.dtype(self.target_dtype)),
            ("mask", (self.mask_steps,), np.dtype(bool)),
        ]
        out += [(f"state_{j}", (w,), np.dtype(self.state_dtype)) for j, w in enumerate(self.state_widths)]
        return out

    def size(self) -> int:
        return _place(self)[1]


def _place(layout: StoreLayout) -> tuple[dict[str, tuple[int, int, tuple[int, ...], np.dtype]], int]:
    """Offsets: ``{part.field: (offset, rows, row shape, dtype)}`` and the total size in bytes."""
    offset = 8 * len(HEADER)
    places: dict[str, tuple[int, int, tuple[int, ...], np.dtype]] = {}
    for part, rows in (("train", layout.train), ("validation", layout.validation)):
        for name, shape, dtype in layout.fields():
            offset = -(-offset // 64) * 64  # cache-line aligned
            places[f"{part}.{name}"] = (offset, rows, shape, dtype)
            offset += rows * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return places, -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE


class Part:
    """The arrays of one part (train or validation) of a store, by field name."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.seq = arrays["seq"]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


class ChunkStore:
    """The arrays of ``layout`` over one memory file. ``create`` makes a new (zeroed, ``seq = -1``) one
    for writing; ``attach(fd)`` maps an existing one read-only (the worker)."""

    def __init__(self, layout: StoreLayout, fd: int, writable: bool) -> None:
        self.layout = layout
        self.fd = fd
        self._close_fd = weakref.finalize(self, _close_quietly, fd)
        size = layout.size()
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        self._mmap = mmap.mmap(fd, size, access=access)
        places, _ = _place(layout)
        buf: Any = self._mmap if writable else memoryview(self._mmap)
        self.header = np.frombuffer(buf, np.int64, len(HEADER), 0)
        parts: dict[str, dict[str, np.ndarray]] = {"train": {}, "validation": {}}
        for key, (offset, rows, shape, dtype) in places.items():
            part, name = key.split(".")
            count = rows * int(np.prod(shape, dtype=np.int64))
            parts[part][name] = np.frombuffer(buf, dtype, count, offset).reshape(rows, *shape)
        self.train = Part(parts["train"])
        self.validation = Part(parts["validation"])

    @classmethod
    def create(cls, layout: StoreLayout) -> ChunkStore:
        fd = _memory_file()
        os.ftruncate(fd, layout.size())  # sparse: pages are committed when written
        store = cls(layout, fd, writable=True)
        store.train.seq[:] = -1
        store.validation.seq[:] = -1
        return store

    @classmethod
    def attach(cls, layout: StoreLayout, fd: int) -> ChunkStore:
        return cls(layout, fd, writable=False)

    def counter(self, name: str) -> int:
        return int(self.header[HEADER.index(name)])

    def set_counter(self, name: str, value: int) -> None:
        self.header[HEADER.index(name)] = value

    def close(self) -> None:
        """Unmap and close the file (arrays taken from the store must not be used afterwards)."""
        self.header = self.train = self.validation = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError):  # a view still exported: unmapped with its last reference
            self._mmap.close()
        self._close_fd()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _memory_file() -> int:
    """A file descriptor of an anonymous memory file (``memfd``), or of an unlinked temporary file."""
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("rnnstream-replay")
        except OSError:
            pass
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="rnnstream-replay-", dir=shm)
    os.unlink(path)
    return fd
