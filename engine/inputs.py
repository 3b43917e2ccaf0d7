"""Checking and converting event inputs before they reach the engine's state.

Every check names the event at fault; nothing here touches any stream's state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.errors import InvalidInputError


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"input is not a numeric array: {exc}") from exc


def check_features(x: Any, feature_size: int, where: str = "event") -> np.ndarray:
    """One event's feature vector as ``(feature_size,) float32``.

    Accepts lists, numpy arrays and tensors of any real floating dtype; refuses integer, bool, complex or
    object dtypes, a wrong length and NaN/Inf.
    """
    arr = _as_array(x)
    if arr.dtype.kind != "f":
        raise InvalidInputError(f"{where}: features must be floating point, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != feature_size:
        raise InvalidInputError(f"{where}: expected {feature_size} features, got shape {tuple(arr.shape)}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{where}: features contain NaN or Inf")
    return arr


def check_feature_batch(xs: Any, n: int, feature_size: int) -> np.ndarray:
    """``n`` events' features as ``(n, feature_size) float32``; the first bad row is named."""
    arr = _as_array(xs)
    if arr.dtype.kind != "f":
        raise InvalidInputError(f"features must be floating point, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape != (n, feature_size):
        raise InvalidInputError(
            f"expected features of shape ({n}, {feature_size}) for {n} stream ids, got {tuple(arr.shape)}"
        )
    arr = arr.astype(np.float32, copy=False)
    if np.isfinite(arr.sum()):  # one pass (NaN and Inf propagate); an overflowing sum checks row by row
        return arr
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise InvalidInputError(f"event {bad}: features contain NaN or Inf")
    return arr


def check_category(x: Any, num_embeddings: int, where: str = "event") -> int:
    """One categorical event: an integer id in ``[0, num_embeddings)``."""
    arr = _as_array(x)
    if arr.dtype.kind not in "iu" or arr.size != 1:
        raise InvalidInputError(
            f"{where}: expected one integer category id, got {arr.dtype} of shape {arr.shape}"
        )
    value = int(arr.reshape(()))
    if not 0 <= value < num_embeddings:
        raise InvalidInputError(f"{where}: category id {value} outside [0, {num_embeddings})")
    return value


def check_category_batch(xs: Any, n: int, num_embeddings: int) -> np.ndarray:
    """``n`` categorical events as ``(n,) int64``; the first out-of-range id is named."""
    arr = _as_array(xs)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"category ids must be integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1) if arr.ndim == 2 and arr.shape[1:] == (1,) else arr
    if arr.shape != (n,):
        raise InvalidInputError(f"expected {n} category ids, got shape {tuple(arr.shape)}")
    bad = np.flatnonzero((arr < 0) | (arr >= num_embeddings))
    if len(bad):
        i = int(bad[0])
        raise InvalidInputError(f"event {i}: category id {int(arr[i])} outside [0, {num_embeddings})")
    return arr.astype(np.int64, copy=False)
