"""Process-level tuning for a long-running inference loop.

Garbage collector: with torch and a model loaded, a full collection walks hundreds of thousands of
long-lived objects and stalls every thread for ~100 ms, which sets the tail latency. ``freeze_startup``
moves everything alive at startup into the permanent generation so later collections skip it.

glibc's malloc serves allocations above a (dynamic) threshold with fresh ``mmap`` pages and returns them
on ``free``. A step over a few thousand streams allocates temporaries of several MiB (gates, gathered
states), so every step would page-fault its working memory in again: measured here, the first seconds of
a run were 2-4x slower than the steady state. Raising the mmap threshold to 64 MiB keeps those
temporaries in the reusable heap, while the large state tensors (hundreds of MiB at a million streams)
still come from ``mmap`` and go back to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 << 20
TRIM_THRESHOLD_BYTES = 256 << 20

_tuned = False


def tune_allocator() -> bool:
    """Apply the thresholds once per process (glibc on Linux only); returns whether they are in force."""
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return _tuned
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _tuned = ok
    return ok


def freeze_startup_objects() -> None:
    """``gc.freeze()``: objects alive now (modules, the model, clients) are never scanned again."""
    gc.collect()
    gc.freeze()
