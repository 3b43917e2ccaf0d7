"""Decoding message payloads into events, and encoding outputs. Shared by every message-based source
(Kafka, MQTT, ...). A payload that cannot become a valid event raises ``DecodeError`` with the reason
that goes into the dead-letter record; nothing else is touched.

Payload formats (one message = one stream's event(s)):

- ``json``: ``{"x": [f1, ..., fF]}`` (one timestep) or ``{"x": [[...], [...]]}`` (several consecutive
  timesteps); a categorical model takes ``{"x": 3}`` or ``{"x": [3, 4, 5]}``. Optional ``"ts"`` (seconds),
  ``"label"`` (feedback), ``"control"`` (``"start"``, ``"end"``, ``"reset"``; then ``"x"`` may be absent).
- ``msgpack``: the same structure, msgpack-encoded.
- ``float32``: raw little-endian float32 frames, ``T * F * 4`` bytes for ``T`` timesteps of ``F``
  features (no control, no label).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgpack
import numpy as np
import orjson

Encoding = Literal["json", "msgpack", "float32"]
ENCODINGS: tuple[Encoding, ...] = ("json", "msgpack", "float32")
CONTROLS = ("start", "end", "reset")
FLOAT32_MAX = float(np.finfo(np.float32).max)
_loads, _JSONDecodeError = orjson.loads, orjson.JSONDecodeError


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(v: int | float) -> bool:
    """A finite float64 (an integer too large for a float is not)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


class DecodeError(ValueError):
    """The payload is not a valid event; ``str(error)`` is the dead-letter reason and ``kind`` its
    category for the counters (``malformed``, ``missing_value``, ``non_numeric``, ``out_of_range``,
    ``unknown_channel``, ``missing_channel``, ``bad_timestamp``, ``oversized``...)."""

    def __init__(self, reason: str, kind: str = "malformed") -> None:
        super().__init__(reason)
        self.kind = kind


F = TypeVar("F", bound=Callable[..., Any])


def refusing(decode: F) -> F:
    """Makes a decode function keep its contract, ``DecodeError`` or a result, whatever the input does
    inside it: any other exception (a recursion limit in a parser, an overflow in a conversion...)
    becomes a ``DecodeError`` naming it, kind ``undecodable``. Every decoder is wrapped with it."""

    @functools.wraps(decode)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return decode(*args, **kwargs)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"undecodable ({type(exc).__name__}: {exc})"[:1000], "undecodable") from exc

    return wrapped  # type: ignore[return-value]


@dataclass(slots=True)
class Decoded:
    """One message's content: ``xs`` holds ``T >= 0`` timesteps, ``(T, F)`` features (a list of rows from
    JSON/msgpack, a float32 array from frames) or ``T`` category ids;
    ``control`` runs *after* the message's timesteps (``start``/``reset`` run before them);
    ``stream_id``: whose event it is."""

    xs: list | np.ndarray
    control: str | None = None
    label: Any = None
    ts: float | None = None
    stream_id: str = ""


@dataclass(frozen=True)
class Decoder:
    """Decodes payloads for a model with ``feature_size`` features (or categorical ids below
    ``num_embeddings``). ``max_timesteps`` bounds one message's timesteps (oversized → dead letter)."""

    encoding: Encoding
    feature_size: int
    num_embeddings: int = 0
    max_timesteps: int = 4096

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.encoding == "float32" and self.num_embeddings:
            raise ValueError("float32 frames carry features; a categorical model needs json or msgpack")

    @refusing
    def decode(self, payload: bytes | None, stream_id: str = "") -> Decoded:
        """``payload`` of stream ``stream_id`` as an event; raises ``DecodeError``."""
        return self.decode_unchecked(payload, stream_id)

    def decode_unchecked(self, payload: bytes | None, stream_id: str = "") -> Decoded:
        """``decode`` without ``refusing``'s wrapper (for a caller that has one): other exceptions than
        ``DecodeError`` may escape."""
        if payload is None:
            raise DecodeError("empty payload (tombstone)")
        if self.encoding == "json":
            try:
                doc = _loads(payload)
            except _JSONDecodeError:
                doc = _parse_json(payload)
            # the common case first: {"x": [f1, ..., fF]}, one timestep of finite float32 numbers
            if type(doc) is dict and len(doc) == 1 and not self.num_embeddings:
                x = doc.get("x")
                if type(x) is list and len(x) == self.feature_size:
                    for v in x:
                        if (
                            type(v) is not float and type(v) is not int
                        ) or not -FLOAT32_MAX <= v <= FLOAT32_MAX:
                            break
                    else:
                        return Decoded([x], None, None, None, stream_id)
        elif self.encoding == "float32":
            return Decoded(self._frames(payload), stream_id=stream_id)
        else:
            doc = _parse_msgpack(payload)
        if type(doc) is not dict:
            raise DecodeError(f"payload must be an object with key 'x', got {type(doc).__name__}")
        return self._document(doc, stream_id)

    def _frames(self, payload: bytes) -> np.ndarray:
        frame = 4 * self.feature_size
        if len(payload) == 0 or len(payload) % frame:
            raise DecodeError(
                f"float32 payload of {len(payload)} bytes is not a multiple of {frame} "
                f"({self.feature_size} features x 4 bytes)"
            )
        xs = np.frombuffer(payload, dtype="<f4").reshape(-1, self.feature_size)
        return self._checked_features(xs)

    def _document(self, doc: dict[str, Any], stream_id: str) -> Decoded:
        if len(doc) == 1 and "x" in doc:  # the common case: data only
            xs = self._categories(doc["x"]) if self.num_embeddings else self._features(doc["x"])
            return Decoded(xs, stream_id=stream_id)
        unknown = set(doc) - {"x", "ts", "label", "control"}
        if unknown:
            raise DecodeError(f"unknown keys {sorted(unknown)}")
        control = doc.get("control")
        if control is not None and control not in CONTROLS:
            raise DecodeError(f"unknown control {control!r}; expected one of {CONTROLS}")
        ts = doc.get("ts")
        if ts is not None and (not _is_number(ts) or not _finite(ts)):
            raise DecodeError(f"ts must be a finite number of seconds, got {ts!r}")
        if "x" not in doc:
            if control is None:
                raise DecodeError("missing 'x' (and no control)")
            xs = np.zeros((0,) if self.num_embeddings else (0, self.feature_size), np.float32)
        else:
            xs = self._categories(doc["x"]) if self.num_embeddings else self._features(doc["x"])
        return Decoded(xs, control, doc.get("label"), ts, stream_id)

    def _features(self, x: Any) -> np.ndarray:
        """Checked in plain Python (cheaper than numpy for a few values): each value a number within
        float32's finite range (NaN fails every comparison)."""
        if type(x) is not list or not x:
            raise DecodeError("'x' must be a non-empty list of numbers or of lists of numbers")
        rows = x if type(x[0]) is list else [x]
        if len(rows) > self.max_timesteps:
            raise DecodeError(f"oversized: {len(rows)} timesteps > max {self.max_timesteps}")
        for r, row in enumerate(rows):
            if type(row) is not list or len(row) != self.feature_size:
                raise DecodeError(f"timestep {r}: expected {self.feature_size} features")
            for v in row:
                if type(v) is not float and type(v) is not int:
                    raise DecodeError(f"timestep {r}: features must be numbers")
                if not -FLOAT32_MAX <= v <= FLOAT32_MAX:
                    raise DecodeError(f"timestep {r}: NaN or Inf (or out of float32 range)")
        return rows

    def _checked_features(self, xs: np.ndarray) -> np.ndarray:
        if len(xs) > self.max_timesteps:
            raise DecodeError(f"oversized: {len(xs)} timesteps > max {self.max_timesteps}")
        bad = ~np.isfinite(xs).all(axis=1)
        if bad.any():
            raise DecodeError(f"timestep {int(np.flatnonzero(bad)[0])}: NaN or Inf (or out of float32 range)")
        return xs

    def _categories(self, x: Any) -> np.ndarray:
        ids = x if isinstance(x, list) else [x]
        if not ids or len(ids) > self.max_timesteps:
            raise DecodeError(f"'x' must hold 1 to {self.max_timesteps} category ids")
        for i, v in enumerate(ids):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.num_embeddings:
                raise DecodeError(
                    f"timestep {i}: category id must be an integer in [0, {self.num_embeddings})"
                )
        return ids


@dataclass(frozen=True)
class KeyedDecoder:
    """Messages whose key is the stream id (Kafka): the key must be UTF-8, the payload at most
    ``max_bytes`` and valid for ``decoder``."""

    decoder: Decoder
    max_bytes: int = 1_048_576

    @refusing
    def decode(self, message: Any) -> Decoded:
        """``message``: a ``connectors.base.Message`` with ``key`` and ``payload`` bytes."""
        key = message.key
        if key is None:
            raise DecodeError("missing key: the record key is the stream id")
        try:
            sid = key if isinstance(key, str) else key.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError("key is not UTF-8") from exc
        payload = message.payload
        if payload is not None and len(payload) > self.max_bytes:
            raise DecodeError(f"oversized: {len(payload)} bytes > max {self.max_bytes}")
        return self.decoder.decode_unchecked(payload, sid)  # inside this method's own ``refusing``


def check_label(label: Any) -> Any:
    """A label as feedback takes it: a class id (int), or a non-empty list of finite numbers (a target
    vector, or a CTC transcript of class ids). Raises ``DecodeError`` otherwise."""
    if isinstance(label, bool) or not isinstance(label, int | list):
        raise DecodeError(f"label must be a class id or a list of numbers, got {type(label).__name__}")
    if isinstance(label, list) and (
        not label or not all(_is_number(v) and -FLOAT32_MAX <= v <= FLOAT32_MAX for v in label)
    ):
        raise DecodeError("label list must hold finite numbers")
    return label


@dataclass(frozen=True, slots=True)
class Feedback:
    """A feedback record: ``label`` for a span of one stream's steps, addressed by stream-local steps
    (``start``/``end``, negative = back from now), the ``last`` n steps, or the input ``offsets``
    ``[first, last]`` (inclusive) of the messages it labels, in the stream's input partition."""

    label: Any
    start: int | None = None
    end: int | None = None
    last: int | None = None
    offsets: tuple[int, int] | None = None


@refusing
def decode_feedback(payload: bytes | None) -> Feedback:
    """``{"label": L}`` (the latest step), with at most one of ``"last": n``, ``"start"``/``"end"``, or
    ``"offsets": [first, last]``. JSON."""
    if payload is None:
        raise DecodeError("empty payload (tombstone)")
    doc = _parse_json(payload)
    if type(doc) is not dict or "label" not in doc:
        raise DecodeError("feedback must be an object with key 'label'")
    unknown = set(doc) - {"label", "start", "end", "last", "offsets"}
    if unknown:
        raise DecodeError(f"unknown feedback keys {sorted(unknown)}")
    ints = {k: doc[k] for k in ("start", "end", "last") if k in doc}
    for k, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise DecodeError(f"feedback '{k}' must be an integer")
    if "last" in ints and ints["last"] < 1:
        raise DecodeError("feedback 'last' must be >= 1")
    offsets = doc.get("offsets")
    if offsets is not None:
        ok = type(offsets) is list and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
        if not ok or offsets[0] > offsets[1]:
            raise DecodeError("feedback 'offsets' must be [first, last] input offsets, first <= last")
    if sum(("last" in ints, "start" in ints or "end" in ints, offsets is not None)) > 1:
        raise DecodeError("feedback addresses its span one way: 'last', 'start'/'end' or 'offsets'")
    return Feedback(
        check_label(doc["label"]),
        ints.get("start"),
        ints.get("end"),
        ints.get("last"),
        tuple(offsets) if offsets is not None else None,
    )


def encode_document(doc: dict[str, Any], encoding: Encoding = "json") -> bytes:
    """An output's value: ``doc`` as JSON (numpy arrays and scalars as numbers) or msgpack."""
    if encoding == "msgpack":
        return msgpack.packb(doc, default=_plain)
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _plain(value: Any) -> Any:
    """msgpack's fallback for numpy values."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _parse_json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        try:  # the standard library reads NaN/Infinity literals, which makes a clearer reason
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nesting deeper than it recurses
            raise DecodeError(f"not valid json: {exc}") from exc
        if type(doc) is dict and "x" in doc:
            return doc
        raise DecodeError(f"not valid json: {exc}") from exc


def _parse_msgpack(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not valid msgpack: {exc}") from exc
